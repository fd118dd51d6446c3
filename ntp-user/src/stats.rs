//! `ntp-user stats`: the counters of every loaded responder.

use anyhow::Result;

use crate::xdp::loaded_responder_stats;

pub fn print_stats(json: bool) -> Result<()> {
    let all = loaded_responder_stats()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for stats in all {
        println!("responder (BPF program id {})", stats.program_id);
        for (name, value) in &stats.counters {
            println!("  {name:<28} {value:>14}");
        }
    }
    Ok(())
}
