use std::process::ExitCode;

use petrel::cli::{self, Command, Mode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let prog = args.first().cloned().unwrap_or_else(|| "petrel".into());
    let opts = match cli::parse(args.into_iter().skip(1)) {
        Ok(Command::Run(o)) => *o,
        Ok(Command::Version) => {
            println!("\n{prog}  version: {}\n", petrel::version_string());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}\n\nFor complete USAGE and HELP type:\n   {prog} --help\n");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = petrel::logging::init(
        &opts.log_level,
        &opts.component_log_level,
        opts.log_format.as_deref(),
        opts.log_path.as_deref(),
    ) {
        eprintln!("cannot open log path: {e}");
        return ExitCode::FAILURE;
    }
    let path = opts.config_path.clone().unwrap_or_default();
    let validate = opts.mode == Mode::Validate;
    match petrel::server::run(opts) {
        Ok(()) => {
            if validate {
                println!("configuration '{path}' OK");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            petrel::plog!(
                critical,
                "main",
                "error initializing configuration '{path}': {e}"
            );
            if validate {
                eprintln!("error initializing configuration '{path}': {e}");
            }
            ExitCode::FAILURE
        }
    }
}
