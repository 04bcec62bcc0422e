//! Processes started inside namespaces, logged to files, killed (with their children) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::wait::wait_until;

/// A running process.
#[derive(Debug)]
pub struct Proc {
    /// What it is (`zone-a/gw-1 gateway`).
    pub name: String,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `args` in namespace `ns` (as `uid` when given), logging to `log`.
    pub fn start(
        name: &str,
        ns: &str,
        uid: Option<u32>,
        args: &[String],
        log: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Proc> {
        let file = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
        let err = file.try_clone()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        if let Some(uid) = uid {
            cmd.args(["setpriv", &format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"]);
        }
        cmd.args(args).stdin(Stdio::null()).stdout(file).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {name}: {}", args.join(" ")))?;
        Ok(Proc { name: name.to_owned(), log: log.to_owned(), child: Some(child) })
    }

    /// Its process id while it runs (`ip netns exec` and `setpriv` exec, so this is the program's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last lines of its log.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks it to stop (SIGTERM) and waits up to `deadline`, then kills it.
    pub fn stop(&mut self, deadline: Duration) {
        if let Some(c) = self.child.as_mut() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            if wait_until(deadline, "the process to exit", || matches!(c.try_wait(), Ok(Some(_)))).is_ok() {
                self.child = None;
                return;
            }
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
