//! The system side: `ip` (iproute2) commands and the checks that the emulator can run here.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `ip ARGS`, failing with the command and its error output.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (iproute2): is it installed? (apt-get install -y iproute2)")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `ip ARGS` and tells whether it succeeded, quietly (for clean-ups).
pub(crate) fn ip_ok(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs several `ip` commands in one process (`ip [-n NETNS] -batch -`), stopping at the first
/// that fails.
pub(crate) fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `ip` (iproute2): is it installed? (apt-get install -y iproute2)")?;
    let script = lines.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).context("writing to `ip -batch`")?;
    }
    let out = child.wait_with_output().context("waiting for `ip -batch`")?;
    if !out.status.success() {
        bail!(
            "`ip{} -batch` failed: {}\n(commands: {})",
            netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("; ")
        );
    }
    Ok(())
}

/// The effective user id, from `/proc/self/status`.
pub(crate) fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Fails with a clear message unless this process can create TUN devices and namespaces.
pub(crate) fn check_capabilities() -> Result<()> {
    if effective_uid() != Some(0) {
        bail!(
            "the network emulator needs root (TUN devices, network namespaces, routes); \
             run as root (effective uid is {:?})",
            effective_uid()
        );
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        bail!("the network emulator needs /dev/net/tun (the tun kernel module), which is missing");
    }
    let version = Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !version.is_ok_and(|s| s.success()) {
        bail!("the network emulator needs `ip` from iproute2: apt-get install -y iproute2");
    }
    Ok(())
}

/// Whether a network namespace of this name exists.
pub(crate) fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists() || std::path::Path::new("/var/run/netns").join(name).exists()
}

/// Whether a device of this name exists in the root namespace.
pub(crate) fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}
