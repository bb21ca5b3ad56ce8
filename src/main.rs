//! Command-line entry point.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use qudata_agent::config::{self, Scope};

#[derive(Parser)]
#[command(name = "qudata-agent", version, about = "Qudata GPU host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version.
    Version,
    /// Check every setting and print the effective configuration (no secret is shown).
    #[command(after_help = config::help_text(&[Scope::Run, Scope::Host]))]
    CheckConfig {
        /// Validate for local mode (no API key needed).
        #[arg(long)]
        local: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("qudata-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig { local } => match config::Config::load(&config::ProcessEnv, local) {
            Ok(cfg) => {
                println!("{cfg:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("qudata-agent: {e}");
                ExitCode::from(2)
            }
        },
    }
}
