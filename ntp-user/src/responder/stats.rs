//! `ntp-user stats`: the counters of every loaded responder.

use std::io::Write as _;

use anyhow::Result;

use crate::responder::loaded_responder_stats;

pub fn print_stats(json: bool) -> Result<()> {
    let all = loaded_responder_stats()?;
    let mut out = std::io::stdout().lock();
    let written = if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)
    } else {
        all.iter().try_for_each(|stats| {
            writeln!(out, "responder (BPF program id {})", stats.program_id)?;
            for (name, value) in &stats.counters {
                writeln!(out, "  {name:<28} {value:>14}")?;
            }
            Ok(())
        })
    };
    match written {
        // `ntp-user stats | head` closing the pipe is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
