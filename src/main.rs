//! Command-line entry point: parses arguments and settings, then hands over to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use qudata_agent::agent;
use qudata_agent::config::{self, Config, Scope};

#[derive(Parser)]
#[command(name = "qudata-agent", version, about = "Qudata GPU host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: register with the control plane, serve the API, run instances.
    #[command(after_help = config::help_text(&[Scope::Run, Scope::Host]))]
    Run {
        /// No control plane and no frpc: a generated secret, the API on 127.0.0.1.
        #[arg(long)]
        local: bool,
    },
    /// Print the version.
    Version,
}

/// Exit status for a setting that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn load_config(local: bool) -> Result<Config, ExitCode> {
    Config::load(&config::ProcessEnv, local).map_err(|e| {
        eprintln!("qudata-agent: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("qudata-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run { local } => {
            let cfg = match load_config(local) {
                Ok(cfg) => cfg,
                Err(code) => return code,
            };
            agent::logging::init(cfg.debug);
            let result = if local {
                runtime().block_on(agent::run_local(cfg))
            } else {
                runtime().block_on(agent::run(cfg))
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("qudata-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
