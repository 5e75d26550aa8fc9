//! Object names and paths.

use std::cmp::Ordering;

use crate::error::{Error, Result};

/// Longest accepted object name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Checks a name for a new object: not empty, no `/`, no control characters.
///
/// # Errors
/// [`Error::InvalidName`].
pub fn check_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "it is longer than 255 bytes"
    } else if name.contains('/') {
        "it contains '/'"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Checks a client-chosen id (`object-add`, `device_add`) as QEMU does: a letter, then
/// letters, digits, `-`, `.` and `_`.
///
/// # Errors
/// [`Error::InvalidName`].
pub fn check_id(id: &str) -> Result<()> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && id.len() <= 128;
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: id.to_owned(),
            reason:
                "an id must start with a letter and hold only letters, digits, '-', '.' and '_'"
                    .to_owned(),
        })
    }
}

/// The path of a child `name` of the object at `parent`.
pub fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// The components of a path, with empty ones (`//`, a trailing `/`) skipped as QEMU does.
pub fn components(path: &str) -> impl Iterator<Item = &str> + Clone {
    path.split('/').filter(|p| !p.is_empty())
}

/// Orders names so that `device[2]` comes before `device[10]`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na
                    .len()
                    .cmp(&nb.len())
                    .then_with(|| na.cmp(nb))
                    .then_with(|| da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let first = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len());
    &digits[first..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("device[0]").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn ids_are_identifiers() {
        assert!(check_id("rng0").is_ok());
        assert!(check_id("a.b-c_d").is_ok());
        assert!(check_id("0rng").is_err());
        assert!(check_id("a b").is_err());
        assert!(check_id("").is_err());
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["device[10]", "device[2]", "device[1]", "bus", "device[02]"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            ["bus", "device[1]", "device[2]", "device[02]", "device[10]"]
        );
    }

    #[test]
    fn components_skip_empty_parts() {
        assert_eq!(
            components("//machine//peripheral/").collect::<Vec<_>>(),
            ["machine", "peripheral"]
        );
        assert_eq!(components("/").count(), 0);
    }
}
