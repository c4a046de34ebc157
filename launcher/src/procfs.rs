//! What `/proc` says about processes: needed because a process that has died but is not yet
//! reaped (a zombie) still counts for kill(2), and the launcher may be the one that must reap it
//! (as PID 1 in a container, orphans are re-parented to it).

use std::fs;

/// The fields of `/proc/<pid>/stat` the launcher uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    /// `R`, `S`, `D`, `Z` (zombie), ...
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
}

impl Stat {
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Parses one `/proc/<pid>/stat` line: `pid (comm) state ppid pgrp ...`; `comm` may contain
/// spaces and parentheses, so the fields are read after the last `)`.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let (head, rest) = line.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Stat {
        pid,
        state,
        ppid,
        pgrp,
    })
}

/// Every process visible in `/proc`.
pub fn all() -> Vec<Stat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let pid: u32 = name.to_str()?.parse().ok()?;
            parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
        })
        .collect()
}

/// Whether a process of group `pgid` is alive (zombies do not count).
pub fn group_has_live_members(pgid: u32) -> bool {
    all().iter().any(|p| p.pgrp == pgid && !p.is_zombie())
}

/// Reaps zombies re-parented to the launcher (it is PID 1 in a container, or a sub-reaper):
/// what its children left behind. The launcher's own children lead their process groups
/// (`pgrp == pid`) and are never touched here, so their exit statuses stay theirs to read.
pub fn reap_orphans() {
    let me = std::process::id();
    for orphan in all()
        .iter()
        .filter(|p| p.ppid == me && p.is_zombie() && p.pgrp != p.pid)
    {
        // SAFETY: waitpid on one specific pid with WNOHANG; no memory is shared.
        unsafe {
            libc::waitpid(
                orphan.pid as libc::pid_t,
                std::ptr::null_mut(),
                libc::WNOHANG,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines_with_odd_names() {
        let stat = parse_stat("4242 (tricky) name) S 1 4242 4242 0 -1 4194560").unwrap();
        assert_eq!(
            stat,
            Stat {
                pid: 4242,
                state: 'S',
                ppid: 1,
                pgrp: 4242
            }
        );
        assert!(parse_stat("12 (z) Z 3 12").unwrap().is_zombie());
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn reaps_orphans_but_not_its_own_children() {
        use std::os::unix::process::CommandExt;
        use std::time::{Duration, Instant};
        // Stand in for PID 1: orphans of this test process's children become its children.
        // SAFETY: prctl with integer arguments.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 0.2 & echo $!"])
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        // Read to the end without reaping the child: the end comes when the sleep exits.
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        let orphan: u32 = out.trim().parse().unwrap();
        let leader = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            reap_orphans();
            let orphan_listed = all().iter().any(|p| p.pid == orphan);
            if !orphan_listed {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "orphan {orphan} was never reaped"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The direct child (a zombie now) was left for its owner to reap.
        assert!(all().iter().any(|p| p.pid == leader && p.is_zombie()));
        assert!(child.wait().unwrap().success());
    }

    #[test]
    fn sees_this_process() {
        let me = std::process::id();
        let stat = all().into_iter().find(|p| p.pid == me).expect("listed");
        assert!(!stat.is_zombie());
    }
}
