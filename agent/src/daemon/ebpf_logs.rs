//! Forwards aya-log records from the programs to the agent's log.

use tokio::io::{Interest, unix::AsyncFd};

pub fn spawn(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("eBPF program logs unavailable: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, open as long as the AsyncFd owns the logger.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("eBPF program logs unavailable: {}", e.into_parts().1);
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
