//! The daemon's log and its unit status under systemd. The log is tracing's text lines on
//! stderr; when stderr is the journal's stream (systemd sets `JOURNAL_STREAM` to its device
//! and inode) every line starts with its syslog priority, `<4>` and so on (sd-daemon(3)), so
//! the journal files warnings as `warning` and errors as `err` (`journalctl -p warning`), and
//! the journal's own timestamps replace tracing's. `systemctl status` shows the status line
//! the daemon sends with sd_notify (`STATUS=`), when the unit gives it a notify socket.

use std::fmt;
use std::io::IsTerminal as _;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;

use tracing::{debug, Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// syslog(3)'s priority for a tracing level: err, warning, info, debug.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// An event format that starts each line with the event's syslog priority (`<N>`), which the
/// journal strips and records as the entry's PRIORITY. A message of several lines (an error
/// chain, a config file's error) gets the prefix on each: the journal files every line on its
/// own, and a continuation line must neither fall to the default priority nor set its own.
pub struct SyslogPriorityPrefix<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for SyslogPriorityPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut text = String::new();
        self.0.format_event(ctx, Writer::new(&mut text), event)?;
        let priority = syslog_priority(event.metadata().level());
        for line in text.strip_suffix('\n').unwrap_or(&text).split('\n') {
            writeln!(writer, "<{priority}>{line}")?;
        }
        Ok(())
    }
}

/// Whether `journal_stream` (the value of `JOURNAL_STREAM`, "DEVICE:INODE") names the file
/// with `device` and `inode`.
pub fn names_stream(journal_stream: &str, device: u64, inode: u64) -> bool {
    journal_stream
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((device, inode))
}

/// Whether stderr is connected to the journal (not merely a child of a process that was).
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    stream
        .to_str()
        .is_some_and(|s| names_stream(s, meta.dev(), meta.ino()))
}

/// Installs the log: `RUST_LOG`, else `default_filter`; priorities for the journal, colours
/// for a terminal.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if stderr_is_journal() {
        builder
            .with_ansi(false)
            .event_format(SyslogPriorityPrefix(
                format::Format::default().without_time(),
            ))
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Sets the unit's status line (`systemctl status`): nothing without a notify socket.
pub fn notify_status(status: &str) {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Status(status)]) {
        debug!(error = %e, "sd_notify STATUS");
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_line_starts_with_its_syslog_priority() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .event_format(SyslogPriorityPrefix(
                format::Format::default().without_time(),
            ))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("an error");
            tracing::warn!(repair = "address", "drift repaired");
            tracing::info!("serving");
            tracing::debug!("detail");
            tracing::warn!("first line\n<0>second line");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        for (line, prefix, words) in [
            (lines[0], "<3>", "an error"),
            (lines[1], "<4>", "drift repaired repair=\"address\""),
            (lines[2], "<6>", "serving"),
            (lines[3], "<7>", "detail"),
            (lines[4], "<4>", "first line"),
            (lines[5], "<4><0>second line", "second line"),
        ] {
            assert!(line.starts_with(prefix) && line.contains(words), "{line:?}");
        }
    }

    #[test]
    fn journal_stream_must_name_the_same_device_and_inode() {
        assert!(names_stream("8:1234", 8, 1234));
        assert!(!names_stream("8:1234", 8, 1235));
        assert!(!names_stream("9:1234", 8, 1234));
        assert!(!names_stream("garbage", 8, 1234));
        assert!(!names_stream("", 0, 0));
    }
}
