//! BPF_PROG_TEST_RUN: frames through the loaded responder without a network, for the kernel
//! fixtures and the micro benchmark.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use aya::programs::{TestRun, TestRunOptions};

use super::object::{PEER_PASS_PROGRAM, RESPONDER_PROGRAM};
use super::Responder;

/// What a packet run through the program (BPF_PROG_TEST_RUN) came out as.
#[derive(Debug, Clone)]
pub struct TestRunOutcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

impl Responder {
    /// Runs one frame through the responder in the kernel (BPF_PROG_TEST_RUN).
    pub fn test_run(&mut self, frame: &[u8]) -> Result<TestRunOutcome> {
        let (action, frame, _) = self.run_frame(RESPONDER_PROGRAM, frame)?;
        Ok(TestRunOutcome { action, frame })
    }

    /// Runs a fresh copy of `frame` `runs` times, one run per syscall: the verdict (all must
    /// agree) and the kernel's mean time for one run (its timer included). One call with a
    /// `repeat` count would not do: the kernel runs every repetition on the same buffer, so
    /// after a reply (written in place) the later runs would see the reply.
    pub fn test_run_mean(&mut self, frame: &[u8], runs: u32) -> Result<(u32, Duration)> {
        self.mean_run(RESPONDER_PROGRAM, frame, runs)
    }

    /// The same timing of the program that only says XDP_PASS: what the kernel's test harness
    /// and timer cost by themselves, to read the responder's figures net of them.
    pub fn test_run_floor(&mut self, frame: &[u8], runs: u32) -> Result<Duration> {
        Ok(self.mean_run(PEER_PASS_PROGRAM, frame, runs)?.1)
    }

    fn mean_run(&mut self, program: &str, frame: &[u8], runs: u32) -> Result<(u32, Duration)> {
        let mut total = Duration::ZERO;
        let mut verdict = None;
        for _ in 0..runs.max(1) {
            let (action, _, took) = self.run_frame(program, frame)?;
            if verdict.is_some_and(|v| v != action) {
                bail!("the verdict changed between runs of one frame ({verdict:?} then {action})");
            }
            verdict = Some(action);
            total += took;
        }
        Ok((verdict.unwrap_or(0), total / runs.max(1)))
    }

    /// One run of `program` on `frame`: verdict, output frame, the kernel's time for it.
    fn run_frame(&mut self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>, Duration)> {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.xdp(program)?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }
}
