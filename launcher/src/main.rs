//! `lorax-launcher`: downloads a model, starts its shards and the router, and supervises them.

mod args;
mod childlog;
mod commands;
mod launch;
mod locate;
mod logging;
mod process;
mod procfs;

#[cfg(test)]
mod docs;

use std::process::ExitCode;

use clap::CommandFactory;

use crate::args::Args;
use crate::launch::Launcher;
use crate::process::Signals;

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args =
        Args::from_matches(&matches).unwrap_or_else(|e| e.format(&mut Args::command()).exit());
    if let Err(message) = args.validate() {
        Args::command()
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit();
    }
    logging::init(args.json_output);
    tracing::info!("{args:?}");
    for unused in args.unused_flags() {
        tracing::warn!("accepted for LoRAX compatibility, without effect: {unused}");
    }
    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = Launcher::new(args, signals).and_then(|launcher| launcher.run());
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
