//! A real KVM guest: one vCPU in 32-bit flat protected mode running a small
//! program that reads, writes or checksums guest pages on command, then
//! exits to the VMM with `out 0x10, al`.
//!
//! Guest-physical layout: the program at 0x1000 (page 1), the command block
//! at 0x2000 (page 2); pages from [`FIRST_DATA_PAGE`] on are data. So every
//! command touches pages 1 (read) and 2 (read, and written by the VMM).

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::memory::{GuestMemory, PAGE};

pub const CODE_GPA: u64 = 0x1000;
pub const CMD_GPA: u64 = 0x2000;
pub const FIRST_DATA_PAGE: u32 = 16;
/// Pages the guest program itself touches on every command.
pub const OVERHEAD_PAGES: [u32; 2] = [1, 2];
const EXIT_PORT: u16 = 0x10;

/// Operations of the guest program (command block word 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum GuestOp {
    Read = 1,
    Write = 2,
    Checksum = 3,
}

/// A tiny x86 assembler: bytes plus rel8 jump fix-ups.
struct Asm {
    code: Vec<u8>,
    labels: std::collections::HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn new() -> Self {
        Self {
            code: Vec::new(),
            labels: Default::default(),
            fixups: Vec::new(),
        }
    }
    fn label(&mut self, l: &'static str) {
        self.labels.insert(l, self.code.len());
    }
    fn b(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }
    /// `mov r32, [disp32]` with the given ModRM reg field.
    fn load(&mut self, reg: u8, addr: u32) {
        self.b(&[0x8B, (reg << 3) | 0b101]);
        self.b(&addr.to_le_bytes());
    }
    /// A short jump: `op rel8`.
    fn jmp8(&mut self, op: u8, l: &'static str) {
        self.b(&[op, 0]);
        self.fixups.push((self.code.len() - 1, l));
    }
    fn finish(mut self) -> Vec<u8> {
        for (at, l) in &self.fixups {
            let target = self.labels[l] as isize;
            let rel = target - (*at as isize + 1);
            self.code[*at] = i8::try_from(rel).expect("short jump in range") as u8;
        }
        self.code
    }
}

const EAX: u8 = 0;
const ECX: u8 = 1;
const EDX: u8 = 2;
const ESI: u8 = 6;
const EDI: u8 = 7;

/// The guest program, to be placed at [`CODE_GPA`].
pub fn program() -> Vec<u8> {
    let c = CMD_GPA as u32;
    let mut a = Asm::new();
    a.label("start");
    a.load(EAX, c); // op
    a.load(ESI, c + 4); // start address
    a.load(ECX, c + 8); // count
    a.load(EDX, c + 12); // stride
    a.load(EDI, c + 20); // seed
    a.b(&[0x83, 0xF8, 1]); // cmp eax, 1
    a.jmp8(0x74, "read"); // je
    a.b(&[0x83, 0xF8, 2]); // cmp eax, 2
    a.jmp8(0x74, "write");
    a.b(&[0x83, 0xF8, 3]); // cmp eax, 3
    a.jmp8(0x74, "checksum");
    a.jmp8(0xEB, "done");
    a.label("read");
    a.b(&[0x8B, 0x1E]); // mov ebx, [esi]
    a.b(&[0x01, 0xD6]); // add esi, edx
    a.b(&[0x49]); // dec ecx
    a.jmp8(0x75, "read"); // jnz
    a.jmp8(0xEB, "done");
    a.label("write");
    a.b(&[0x89, 0xF3]); // mov ebx, esi
    a.b(&[0x31, 0xFB]); // xor ebx, edi
    a.b(&[0x89, 0x1E]); // mov [esi], ebx
    a.b(&[0x01, 0xD6]); // add esi, edx
    a.b(&[0x49]); // dec ecx
    a.jmp8(0x75, "write");
    a.jmp8(0xEB, "done");
    a.label("checksum");
    a.b(&[0x31, 0xDB]); // xor ebx, ebx
    a.label("cs");
    a.b(&[0x03, 0x1E]); // add ebx, [esi]
    a.b(&[0xD1, 0xC3]); // rol ebx, 1
    a.b(&[0x01, 0xD6]); // add esi, edx
    a.b(&[0x49]); // dec ecx
    a.jmp8(0x75, "cs");
    a.b(&[0x89, 0x1D]); // mov [c+16], ebx
    a.b(&(c + 16).to_le_bytes());
    a.label("done");
    a.b(&[0xE6, EXIT_PORT as u8]); // out 0x10, al
    a.jmp8(0xEB, "start");
    a.finish()
}

/// One VM with one vCPU over the test VMM's guest memory.
#[derive(Debug)]
pub struct KvmGuest {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: VcpuFd,
    pub exits: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("open /dev/kvm: {0} (KVM guests need /dev/kvm readable and writable)")]
    Open(kvm_ioctls::Error),
    #[error("{what}: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("unexpected vCPU exit: {0}")]
    Exit(String),
}

fn io(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

impl KvmGuest {
    /// Create the VM over `mem`, whose program page the caller has written
    /// (see [`install_program`]) or will serve through the uffd.
    pub fn new(mem: &GuestMemory) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let vm = kvm.create_vm().map_err(io("KVM_CREATE_VM"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem.len() as u64,
            userspace_addr: mem.addr(),
        };
        // SAFETY: the region is a live mapping of `mem.len()` bytes that
        // outlives the VM (the caller keeps `mem` until the guest is dropped).
        unsafe { vm.set_user_memory_region(region) }.map_err(io("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(io("KVM_CREATE_VCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(io("KVM_GET_SREGS"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr0 |= 1; // protected mode, no paging
        vcpu.set_sregs(&sregs).map_err(io("KVM_SET_SREGS"))?;
        let mut regs = vcpu.get_regs().map_err(io("KVM_GET_REGS"))?;
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        vcpu.set_regs(&regs).map_err(io("KVM_SET_REGS"))?;
        Ok(Self {
            _kvm: kvm,
            _vm: vm,
            vcpu,
            exits: 0,
        })
    }

    /// Run one command to completion. Returns the checksum word of the
    /// command block (meaningful after [`GuestOp::Checksum`]).
    pub fn command(
        &mut self,
        mem: &GuestMemory,
        op: GuestOp,
        start_page: u32,
        count: u32,
        stride: u32,
        seed: u32,
    ) -> Result<u32, KvmError> {
        assert!(count > 0, "the guest program needs count >= 1");
        mem.write_u32(CMD_GPA, op as u32);
        mem.write_u32(CMD_GPA + 4, (start_page as u64 * PAGE) as u32);
        mem.write_u32(CMD_GPA + 8, count);
        mem.write_u32(CMD_GPA + 12, stride);
        mem.write_u32(CMD_GPA + 20, seed);
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, _)) if port == EXIT_PORT => {
                    self.exits += 1;
                    return Ok(mem.read_u32(CMD_GPA + 16));
                }
                Ok(VcpuExit::Intr) => continue,
                Ok(other) => return Err(KvmError::Exit(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return Err(KvmError::Ioctl {
                        what: "KVM_RUN",
                        source: e,
                    });
                }
            }
        }
    }
}

/// Write the program into guest memory at [`CODE_GPA`].
pub fn install_program(mem: &GuestMemory) {
    mem.write_bytes(CODE_GPA, &program());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_assembles_with_short_jumps() {
        let p = program();
        assert!(p.len() < 200, "{} bytes", p.len());
        assert_eq!(
            &p[..5],
            &[0x8B, 0x05, 0x00, 0x20, 0x00],
            "mov eax, [0x2000]"
        );
        assert_eq!(&p[p.len() - 4..p.len() - 2], &[0xE6, 0x10]);
    }
}
