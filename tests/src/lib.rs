//! Helpers of qomu's end-to-end tests: KVM availability, machines booting the test guests,
//! and waiting for their console lines and events.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machine::{Machine, MachineConfig};
use qom::{SubscribeOptions, Subscriber, Target, Value};

/// How long a test waits for a guest before failing (guests are slow where KVM emulates
/// ring 0, and CI machines are shared).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Whether `/dev/kvm` can be used. When it cannot, the test prints why and returns early:
/// the one case where these tests may skip.
pub fn kvm_usable(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

/// Skips the calling test (with a message) when KVM is not usable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_usable(module_path!()) {
            return;
        }
    };
}

/// Whether the CPU has hardware virtualization (vmx or svm), as a Linux guest needs.
pub fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
}

/// A machine booting one of the test guests, with its console and `/machine` events
/// subscribed to from the start.
pub struct TestVm {
    pub machine: Arc<Machine>,
    pub client: Subscriber,
    lines: VecDeque<String>,
    events: VecDeque<(String, Value)>,
}

impl TestVm {
    /// A machine in prelaunch booting guest `name` with command line `append`, a debug-exit
    /// port, and `extra` devices.
    pub fn new(name: &str, append: &str) -> TestVm {
        Self::with_config(MachineConfig {
            devices: vec!["isa-debug-exit".parse().expect("device spec")],
            ..MachineConfig::with_kernel(qomu_guests::path(name), append)
        })
    }

    pub fn with_config(config: MachineConfig) -> TestVm {
        let machine = Machine::new(&config).expect("machine");
        let client = machine.tree().subscriber("test");
        client
            .subscribe(
                Target::Type("isa-serial".into()),
                "line",
                SubscribeOptions {
                    queue_limit: Some(100_000),
                    coalesce: false,
                },
            )
            .expect("line");
        for n in ["STOP", "RESUME", "RESET", "SHUTDOWN", "POWERDOWN"] {
            client
                .subscribe(
                    Target::Object("/machine".into()),
                    n,
                    SubscribeOptions::default(),
                )
                .expect("event");
        }
        TestVm {
            machine,
            client,
            lines: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Starts the guest.
    pub fn start(&self) -> &Self {
        self.machine.cont().expect("cont");
        self
    }

    fn pump(&mut self, wait: Duration) {
        self.client.wait(wait);
        for d in self.client.drain() {
            let e = &d.event;
            if &*e.notifier == "line" {
                let line = e
                    .data
                    .field("line")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                self.lines.push_back(line);
            } else {
                self.events
                    .push_back((e.notifier.to_string(), e.data.clone()));
            }
        }
    }

    /// Waits for a console line containing `text` (consuming lines up to it).
    pub fn wait_line(&mut self, text: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            while let Some(line) = self.lines.pop_front() {
                if line.contains(text) {
                    return line;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no console line containing {text:?} within {PATIENCE:?}"
            );
            self.pump(Duration::from_millis(50));
        }
    }

    /// Waits for the next `/machine` event named `name`; returns its data.
    pub fn wait_event(&mut self, name: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(i) = self.events.iter().position(|(n, _)| n == name) {
                return self
                    .events
                    .remove(i)
                    .map(|(_, d)| d)
                    .unwrap_or(Value::Bool(false));
            }
            assert!(
                Instant::now() < deadline,
                "no {name} event within {PATIENCE:?}"
            );
            self.pump(Duration::from_millis(50));
        }
    }

    /// Every console line and event received so far (lines are not consumed).
    pub fn lines_so_far(&mut self) -> Vec<String> {
        self.pump(Duration::ZERO);
        self.lines.iter().cloned().collect()
    }

    /// Events received so far, by name, in order (consumed).
    pub fn take_events(&mut self) -> Vec<String> {
        self.pump(Duration::ZERO);
        self.events.drain(..).map(|(n, _)| n).collect()
    }

    /// Waits for the VMM to end; returns the exit status.
    pub fn wait_exit(&self) -> i32 {
        self.machine
            .wait_for_exit_timeout(PATIENCE)
            .unwrap_or_else(|| panic!("the guest did not end within {PATIENCE:?}"))
    }

    pub fn get(&self, path: &str, property: &str) -> Value {
        self.machine
            .tree()
            .get(path, property)
            .unwrap_or_else(|e| panic!("{path}.{property}: {e}"))
    }
}
