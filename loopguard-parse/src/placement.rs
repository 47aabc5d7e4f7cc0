//! Where on a function an entry probe costs least.
//!
//! A uprobe replaces one instruction with a breakpoint. When it fires, the
//! kernel either emulates the displaced instruction (x86-64: `push` of a
//! register, a one-byte `nop`, direct `jmp`, `call` and conditional jumps)
//! or runs it out of line and single-steps it, a second exception. On a
//! nested-virtualisation VM that second exception is very dear: a probe on
//! glibc's `epoll_wait` (which opens with `cmpb $0, __libc_single_threaded`)
//! cost 15.2 µs a call, the same probe on its third instruction (a `je`)
//! 0.5 µs (docs/OVERHEAD.md, "Where a probe sits").
//!
//! [`entry_probe_offset`] walks a function's first instructions and moves
//! the probe to the first one the kernel emulates, when everything before
//! it is straight-line code that leaves the stack pointer, the argument
//! registers and memory alone: the probe then fires once per call, sees the
//! arguments as at the entry, and a return probe there still finds the
//! return address at the top of the stack. Otherwise the probe stays on
//! the entry.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess,
    Register,
};

/// At most this many instructions are stepped over.
const MAX_SKIPPED: usize = 8;

/// At most this much of a function is decoded to look for branches into
/// its first instructions.
const MAX_SCANNED_BYTES: usize = 16 * 1024;

/// What an entry probe may not see changed before it: the stack pointer
/// (a return probe reads the return address at its top) and the integer
/// argument registers of the System V ABI.
const KEPT: [Register; 7] = [
    Register::RSP,
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// Bytes past the entry of the function whose code is `code`, loaded at
/// `address`, where an entry probe fires once per call with the entry's
/// arguments and stack, on an instruction the kernel emulates; 0 when the
/// entry is one already, or when no such place is certain.
pub fn entry_probe_offset(code: &[u8], address: u64) -> u64 {
    let code = &code[..code.len().min(MAX_SCANNED_BYTES)];
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut chosen = None;
    for _ in 0..=MAX_SKIPPED {
        if !decoder.can_decode() {
            return 0;
        }
        let instruction = decoder.decode();
        if instruction.is_invalid() {
            return 0;
        }
        if is_emulated(&instruction, code, address) {
            chosen = Some(instruction.ip());
            break;
        }
        if !leaves_entry_state(&instruction, &mut factory) {
            return 0;
        }
    }
    let Some(chosen) = chosen else { return 0 };
    if chosen == address || branched_into(&mut decoder, address, chosen) {
        return 0;
    }
    chosen - address
}

/// Whether the kernel emulates `instruction` when a probe displaces it
/// (measured on Linux 6.18; older kernels emulate the branches at least).
fn is_emulated(instruction: &Instruction, code: &[u8], address: u64) -> bool {
    match instruction.code() {
        Code::Push_r64 | Code::Jmp_rel8_64 | Code::Jmp_rel32_64 | Code::Call_rel32_64 => true,
        // The one-byte `nop` only: the longer forms are single-stepped.
        Code::Nopd => {
            let at = (instruction.ip() - address) as usize;
            instruction.len() == 1 && code.get(at) == Some(&0x90)
        }
        _ => instruction.is_jcc_short_or_near(),
    }
}

/// Whether a probe may be moved past `instruction`: it falls through to the
/// next one, and writes neither memory nor a register an entry probe (or a
/// return probe) relies on.
fn leaves_entry_state(instruction: &Instruction, factory: &mut InstructionInfoFactory) -> bool {
    if instruction.flow_control() != FlowControl::Next || instruction.stack_pointer_increment() != 0
    {
        return false;
    }
    let info = factory.info(instruction);
    let writes = |access: OpAccess| {
        !matches!(
            access,
            OpAccess::None | OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess
        )
    };
    let kept_written = info
        .used_registers()
        .iter()
        .any(|used| writes(used.access()) && KEPT.contains(&used.register().full_register()));
    let memory_written = info.used_memory().iter().any(|used| writes(used.access()));
    !kept_written && !memory_written
}

/// Whether any later instruction of the function could jump to an address
/// in `(entry, chosen]`, so that the moved probe could fire without a call:
/// a direct branch there, or any indirect jump (its targets are unknown).
fn branched_into(decoder: &mut Decoder<'_>, entry: u64, chosen: u64) -> bool {
    // The instructions already decoded are the straight-line run before
    // `chosen` and `chosen` itself: only `chosen` can branch.
    let mut instruction = Instruction::default();
    decoder.set_ip(entry);
    decoder.set_position(0).is_err()
        || std::iter::from_fn(|| {
            decoder.can_decode().then(|| {
                decoder.decode_out(&mut instruction);
                instruction
            })
        })
        .any(|instruction| {
            if instruction.is_invalid() {
                return false;
            }
            match instruction.flow_control() {
                FlowControl::IndirectBranch => true,
                FlowControl::UnconditionalBranch
                | FlowControl::ConditionalBranch
                | FlowControl::Call => {
                    let target = instruction.near_branch_target();
                    target > entry && target <= chosen
                }
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc 2.36's `epoll_wait` on Debian 12: `cmpb $0x0,...(%rip)`,
    /// `mov %ecx,%r10d`, `je`, then the single-threaded path, and the
    /// multi-threaded one the `je` leads to.
    const EPOLL_WAIT: &[u8] = &[
        0x80, 0x3d, 0xf1, 0x26, 0x0d, 0x00, 0x00, // cmpb $0x0,0xd26f1(%rip)
        0x41, 0x89, 0xca, // mov %ecx,%r10d
        0x74, 0x14, // je +0x14 (to +0x20)
        0xb8, 0xe8, 0x00, 0x00, 0x00, // mov $0xe8,%eax
        0x0f, 0x05, // syscall
        0x48, 0x3d, 0x00, 0xf0, 0xff, 0xff, // cmp $-0x1000,%rax
        0x77, 0x5d, // ja
        0xc3, // ret
        0x0f, 0x1f, 0x40, 0x00, // nopl 0x0(%rax)
        0x48, 0x83, 0xec, 0x28, // sub $0x28,%rsp (+0x20)
        0xc3, // ret
    ];

    #[test]
    fn glibc_epoll_wait_is_probed_on_its_conditional_jump() {
        assert_eq!(entry_probe_offset(EPOLL_WAIT, 0x0010_8ee0), 10);
    }

    #[test]
    fn an_entry_the_kernel_emulates_stays() {
        // push %rbp; mov %rsp,%rbp
        assert_eq!(
            entry_probe_offset(&[0x55, 0x48, 0x89, 0xe5, 0xc3], 0x1000),
            0
        );
        // push %r15
        assert_eq!(entry_probe_offset(&[0x41, 0x57, 0xc3], 0x1000), 0);
        // jmp +0
        assert_eq!(entry_probe_offset(&[0xeb, 0x00, 0xc3], 0x1000), 0);
    }

    #[test]
    fn endbr64_is_stepped_over() {
        // endbr64; push %rbp
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0xc3];
        assert_eq!(entry_probe_offset(&code, 0x1000), 4);
    }

    #[test]
    fn the_stack_pointer_and_arguments_are_never_stepped_over() {
        // sub $0x28,%rsp; push %rbx
        assert_eq!(
            entry_probe_offset(&[0x48, 0x83, 0xec, 0x28, 0x53, 0xc3], 0x1000),
            0
        );
        // mov %rsi,%rdi; push %rbx
        assert_eq!(
            entry_probe_offset(&[0x48, 0x89, 0xf7, 0x53, 0xc3], 0x1000),
            0
        );
        // xor %ecx,%ecx (writes rcx, an argument); push %rbx
        assert_eq!(entry_probe_offset(&[0x31, 0xc9, 0x53, 0xc3], 0x1000), 0);
        // mov %rax,(%rsp) (a store); push %rbx
        assert_eq!(
            entry_probe_offset(&[0x48, 0x89, 0x04, 0x24, 0x53, 0xc3], 0x1000),
            0
        );
    }

    #[test]
    fn a_branch_back_into_the_skipped_run_keeps_the_entry() {
        // endbr64; mov %ecx,%r10d; je +0; ... jmp back to the mov (+4).
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, // endbr64
            0x41, 0x89, 0xca, // mov %ecx,%r10d (+4)
            0x74, 0x00, // je +0 (+7)
            0xeb, 0xf9, // jmp -7, to +4 (+9)
        ];
        assert_eq!(entry_probe_offset(&code, 0x1000), 0);
        // The same with the jump to the entry itself: nothing skipped is
        // run twice, so the move stands.
        let mut to_entry = code;
        to_entry[10] = 0xf5; // jmp -11, to +0
        assert_eq!(entry_probe_offset(&to_entry, 0x1000), 7);
    }

    #[test]
    fn an_indirect_jump_anywhere_keeps_the_entry() {
        // endbr64; je +0; jmp *%rax
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x74, 0x00, 0xff, 0xe0];
        assert_eq!(entry_probe_offset(&code, 0x1000), 0);
    }

    #[test]
    fn nothing_emulated_nearby_or_bad_bytes_keep_the_entry() {
        // Nine `mov %eax,%r10d`, then `push`.
        let mut code = [0x41, 0x89, 0xc2].repeat(9);
        code.push(0x53);
        assert_eq!(entry_probe_offset(&code, 0x1000), 0);
        assert_eq!(entry_probe_offset(&[0x0f, 0x0b, 0xff], 0x1000), 0);
        assert_eq!(entry_probe_offset(&[], 0x1000), 0);
        // A multi-byte nop is not the one-byte one.
        assert_eq!(entry_probe_offset(&[0x0f, 0x1f, 0x00, 0xc3], 0x1000), 0);
    }
}
