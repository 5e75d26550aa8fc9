/* Entry: the VMM enters here in 64-bit mode with rsi = the Linux zero page. */
    .section .text.start, "ax"
    .global _start
_start:
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi
    call guest_main
    /* guest_main returned: report it and stop here. */
    mov $0x501, %dx
    mov $0x7f, %al
    out %al, %dx
1:  hlt
    jmp 1b
