//! Ctrl-C for the commands that train (`finetune`, `compress`, `train-mlp`): the first SIGINT (or
//! SIGTERM, SIGHUP) asks the run to finish the step it is in and write a checkpoint, so rerunning
//! the same command loses nothing; a second one exits at once (the last periodic checkpoint still
//! resumes). Either way the exit status is 130, what a shell reports for a process ended by
//! SIGINT, so scripts can tell an interrupted run from a failed one.
//!
//! ```text
//! let out = RunOutput { dir: Some(dir.clone()), cancel: Some(interrupt::cancel_flag()), ..RunOutput::default() };
//! let report = run_stages(model, train, eval, plan, &cfg, &out)?;
//! interrupt::check(&report, &dir)?; // Err(Interrupted) when the flag stopped it
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use qn_train::trainer::RunReport;

/// Exit status of a command stopped by an interrupt.
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

/// The flag the signal handler raises; the handler is installed on first use (once per process:
/// the OS keeps one handler per signal).
pub(crate) fn cancel_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let raised = flag.clone();
        // ctrlc runs this on its own thread, not in the signal handler, so printing is safe.
        let installed = ctrlc::set_handler(move || {
            if raised.swap(true, Ordering::SeqCst) {
                eprintln!("\nqn: interrupted again: exiting now; rerun to continue from the last checkpoint");
                std::process::exit(EXIT_INTERRUPTED.into());
            }
            eprintln!(
                "\nqn: interrupted: stopping after the current step with a checkpoint (interrupt \
                 again to exit at once)"
            );
        });
        if let Err(e) = installed {
            eprintln!(
                "qn: warning: cannot catch interrupts ({e}): an interrupted run loses the steps \
                 since its last checkpoint"
            );
        }
        flag
    })
    .clone()
}

/// A run stopped by an interrupt, with its checkpoint on disk; `main` exits 130 on it.
#[derive(Debug)]
pub(crate) struct Interrupted {
    step: usize,
    dir: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.step == 0 {
            write!(f, "interrupted before the first step; nothing to resume")
        } else {
            write!(
                f,
                "interrupted after step {}; `{}` holds its checkpoint: rerun the same command to \
                 continue",
                self.step,
                self.dir.display()
            )
        }
    }
}

impl std::error::Error for Interrupted {}

/// `Err(Interrupted)` when the cancel flag stopped `report`'s run, whose checkpoints are in `dir`.
pub(crate) fn check(report: &RunReport, dir: &Path) -> Result<(), Interrupted> {
    if report.interrupted {
        Err(Interrupted {
            step: report.steps,
            dir: dir.to_path_buf(),
        })
    } else {
        Ok(())
    }
}
