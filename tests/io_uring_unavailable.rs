//! Where io_uring is refused (an old kernel, a seccomp profile, `kernel.io_uring_disabled`), the
//! server must stop at once with a message that names the likely cause, not panic or hang.
//! The refusal is made real with a seccomp filter on the server process alone that answers
//! `io_uring_setup` with ENOSYS, as a container runtime's profile would.
#![cfg(target_arch = "x86_64")]

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// `io_uring_setup` on x86_64.
const SYS_IO_URING_SETUP: u32 = 425;
/// `AUDIT_ARCH_X86_64`: the filter only judges native system calls.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

fn refuse_io_uring() -> std::io::Result<()> {
    const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut program = [
        op(LOAD_WORD, 0, 0, 4), // seccomp_data.arch
        op(JUMP_IF_EQUAL, 1, 0, AUDIT_ARCH_X86_64),
        op(RETURN, 0, 0, libc::SECCOMP_RET_ALLOW),
        op(LOAD_WORD, 0, 0, 0), // seccomp_data.nr
        op(JUMP_IF_EQUAL, 0, 1, SYS_IO_URING_SETUP),
        op(RETURN, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        op(RETURN, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let filter = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls on this (forked, not yet exec'd) process with a valid program.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &filter as *const _,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn refused_io_uring_stops_the_server_with_a_clear_message() {
    let data_dir = std::env::temp_dir().join(format!("mesher-no-uring-{}", std::process::id()));
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesher"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-token",
            "t",
            "--data-dir",
        ])
        .arg(&data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls prctl, which is safe between fork and exec.
    unsafe { command.pre_exec(refuse_io_uring) };
    let child = command.spawn().expect("start mesher");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the server exits instead of hanging")
        .unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot set up io_uring"), "{stderr}");
    for cause in ["5.10", "io_uring_disabled", "seccomp"] {
        assert!(stderr.contains(cause), "names {cause}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}
