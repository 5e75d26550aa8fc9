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

/* The application processors' way in: the boot CPU copies this to AP_BASE (start_ap in
 * rt.h) and sends INIT and STARTUP IPIs with vector AP_BASE >> 12. The AP wakes in real
 * mode at AP_BASE, goes through protected mode into long mode on the boot CPU's page
 * tables (ap_cr3) and calls ap_entry on ap_stack, all patched in by start_ap. */
    .set AP_BASE, 0x2000
    .section .rodata.ap, "a"
    .global ap_trampoline, ap_trampoline_end, ap_cr3, ap_stack, ap_entry
    .code16
ap_trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl AP_BASE + (ap_gdtr - ap_trampoline)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(AP_BASE + (ap_pm - ap_trampoline))
    .code32
ap_pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax            /* PAE */
    mov %eax, %cr4
    mov AP_BASE + (ap_cr3 - ap_trampoline), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx     /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax      /* paging: long mode */
    mov %eax, %cr0
    ljmp $0x18, $(AP_BASE + (ap_lm - ap_trampoline))
    .code64
ap_lm:
    mov AP_BASE + (ap_stack - ap_trampoline), %rsp
    mov AP_BASE + (ap_entry - ap_trampoline), %rax
    call *%rax
2:  hlt
    jmp 2b
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff  /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff  /* 0x10: data */
    .quad 0x00af9a000000ffff  /* 0x18: 64-bit code */
ap_gdtr:
    .word 31
    .long AP_BASE + (ap_gdt - ap_trampoline)
    .balign 8
ap_cr3:
    .quad 0
ap_stack:
    .quad 0
ap_entry:
    .quad 0
ap_trampoline_end:
