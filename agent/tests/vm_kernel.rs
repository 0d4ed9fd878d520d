//! Kernel tests that write cgroup v2 limits and cause OOM kills: they run only inside the kernel
//! lab's VM (`cargo xtask vm`), never on the development machine, and refuse to run elsewhere.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{Agent, otlp};

/// Set by `cargo xtask test` in the guest's environment.
const IN_VM: &str = "NODEWARDEN_IN_VM";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Fails (never skips silently) when not inside the lab VM with cgroup v2 memory.
fn require_vm() {
    assert!(
        std::env::var_os(IN_VM).is_some(),
        "refusing to write cgroups outside the nodewarden VM: run by `cargo xtask test`"
    );
    let controllers = std::fs::read_to_string(Path::new(CGROUP_ROOT).join("cgroup.controllers"))
        .expect("cgroup2 mounted at /sys/fs/cgroup in the VM");
    assert!(
        controllers.split_whitespace().any(|c| c == "memory"),
        "no memory controller: {controllers}"
    );
}

/// A fresh child cgroup with the memory controller, removed at the end.
struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    fn new(name: &str) -> Self {
        std::fs::write(
            Path::new(CGROUP_ROOT).join("cgroup.subtree_control"),
            "+memory",
        )
        .expect("enable memory controller");
        let path = Path::new(CGROUP_ROOT).join(name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).expect("mkdir cgroup");
        Self { path }
    }

    fn memory_event(&self, key: &str) -> u64 {
        let events =
            std::fs::read_to_string(self.path.join("memory.events")).expect("memory.events");
        events
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} missing from memory.events:\n{events}"))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Writes `value` to the cgroup's memory.max from a thread whose comm is `comm`, returning the
/// write's result.
fn write_limit_as(comm: &str, cgroup: &Path, value: &str) -> std::io::Result<()> {
    let file = cgroup.join("memory.max");
    let value = value.to_owned();
    std::thread::Builder::new()
        .name(comm.to_owned())
        .spawn(move || std::fs::write(file, value))
        .expect("spawn writer thread")
        .join()
        .expect("writer thread")
}

#[test]
#[ignore = "writes cgroup v2 limits and causes an OOM kill: runs in the VM via `cargo xtask test`"]
fn limit_write_and_oom_kill_are_counted_and_traced() {
    require_vm();
    let receiver = otlp::Receiver::start();
    let endpoint = receiver.endpoint();
    let agent = Agent::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ]);
    agent.wait_for_sample(
        "nodewarden_probe_attached{capability=\"limit_writes\",hook=\"fexit:memory_max_write\"}",
        1.0,
        Duration::from_secs(5),
    );

    let cg = TestCgroup::new("nw-oom-test");
    let writer = "nw-limit-writer";
    write_limit_as(writer, &cg.path, "64M").expect("memory.max = 64M");
    let rejected = write_limit_as(writer, &cg.path, "abc").expect_err("the kernel rejects abc");
    assert_eq!(rejected.raw_os_error(), Some(libc::EINVAL));
    assert_eq!(
        std::fs::read_to_string(cg.path.join("memory.max"))
            .expect("read memory.max")
            .trim(),
        "67108864"
    );

    // 200 MB held by `tail` (no newline in the input, so it keeps it all) in a 64M cgroup.
    let procs = cg.path.join("cgroup.procs");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo 0 > {} && head -c 209715200 /dev/zero | tail > /dev/null",
            procs.display()
        ))
        .status()
        .expect("run the allocation");
    assert!(
        !status.success(),
        "the allocation should have been killed: {status}"
    );
    let kernel_kills = cg.memory_event("oom_kill");
    assert_eq!(kernel_kills, 1, "memory.events oom_kill");

    let cgroup = "/nw-oom-test";
    agent.wait_for_sample(
        &format!(
            "nodewarden_cgroup_limit_writes_total{{cgroup=\"{cgroup}\",limit=\"memory.max\",result=\"ok\",writer=\"{writer}\"}}"
        ),
        1.0,
        Duration::from_secs(10),
    );
    agent.wait_for_sample(
        &format!(
            "nodewarden_cgroup_limit_writes_total{{cgroup=\"{cgroup}\",limit=\"memory.max\",result=\"EINVAL\",writer=\"{writer}\"}}"
        ),
        1.0,
        Duration::from_secs(10),
    );
    #[expect(clippy::cast_precision_loss, reason = "a count of one")]
    agent.wait_for_sample(
        &format!("nodewarden_oom_kills_total{{cgroup=\"{cgroup}\"}}"),
        kernel_kills as f64,
        Duration::from_secs(10),
    );

    // The agent flushes its spans on SIGTERM.
    let log = agent.log();
    let status = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    assert!(
        receiver.errors().is_empty(),
        "receiver errors: {:?}",
        receiver.errors()
    );
    let spans = receiver.spans();
    let write = spans
        .iter()
        .find(|s| {
            s.name == "cgroup.limit_write"
                && s.attributes.get("cgroup.limit.result").map(String::as_str) == Some("ok")
        })
        .unwrap_or_else(|| panic!("no limit write span in {spans:#?}"));
    assert_eq!(write.service, "nodewarden");
    assert_eq!(write.attributes["cgroup.path"], cgroup);
    assert_eq!(write.attributes["cgroup.limit"], "memory.max");
    assert_eq!(write.attributes["cgroup.limit.value"], "64M");
    assert_eq!(write.attributes["process.command"], writer);

    let kills: Vec<_> = spans.iter().filter(|s| s.name == "oom.kill").collect();
    assert_eq!(kills.len(), 1, "{spans:#?}");
    let kill = kills[0];
    assert_eq!(kill.attributes["cgroup.path"], cgroup);
    assert_eq!(kill.attributes["oom.victim.command"], "tail");
    assert_eq!(kill.attributes["oom.victim.cgroup_source"], "kernel");

    // The kernel's own record names the same victim.
    let dmesg = Command::new("dmesg").output().expect("dmesg");
    let dmesg = String::from_utf8_lossy(&dmesg.stdout);
    let victim_pid = &kill.attributes["oom.victim.pid"];
    assert!(
        dmesg.contains(&format!("Killed process {victim_pid} (tail)")),
        "dmesg does not name victim {victim_pid}:\n{dmesg}"
    );
    assert!(dmesg.contains(&format!("oom_memcg={cgroup}")), "{dmesg}");
    eprintln!("agent log:\n{log}");
}
