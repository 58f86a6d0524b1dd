//! `ckpt-convert`: the command line. Exit codes: 0 success, 1 conversion or
//! validation failure, 2 bad invocation or preflight refusal.

mod cli;

use std::process::ExitCode;

use ckpt_convert::pipeline::report;
use ckpt_wire::Summary;
use clap::{CommandFactory, FromArgMatches};
use cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`ckpt-convert inspect … | head`).
    // SAFETY: resetting a signal disposition at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The steps' help is generated from their parameter tables.
    let command = Cli::command()
        .mut_subcommand("run", |c| {
            c.after_long_help(cli::help::steps())
                .after_help("Run `ckpt-convert run --help` for the steps and their parameters.")
        })
        .mut_subcommand("validate", |c| {
            c.after_long_help(cli::help::step(ckpt_wire::Step::Validate))
        });
    let args = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let default = match args.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("CKPT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
    // Signals end every command cleanly (also as PID 1 in a container, where the
    // kernel drops signals left at their default), and a step's end is reported
    // where the orchestrator looks.
    let step = match &args.command {
        Command::Run { step, .. } => Some(step.clone()),
        Command::Validate { .. } => Some(ckpt_convert::steps::validate::STEP.name().to_owned()),
        _ => None,
    };
    let installed = ckpt_convert::publish::signals::install(Box::new(move |code, why| {
        eprintln!("error: {why}");
        if let Some(step) = &step {
            report::write(&Summary::failed(step, code, why));
        }
    }));
    if let Err(e) = installed {
        eprintln!("error: cannot install signal handlers: {e}");
        return ExitCode::from(1);
    }
    match dispatch(args.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { step, args } if step == ckpt_convert::steps::validate::STEP.name() => {
            return validate(None, &args);
        }
        Command::Run { step, args } if cli::remote::requested(&args) => {
            return cli::remote::run(&step, &args);
        }
        Command::Run { step, args } => {
            // The orchestrator learns the outcome from the termination message.
            let (report, json) = match cli::run_step(&step, &args) {
                Ok(r) => r,
                Err(err) => {
                    report::write(&Summary::failed(
                        &step,
                        i32::from(exit_code(&err)),
                        &format!("{err:#}"),
                    ));
                    return Err(err);
                }
            };
            report::write(&report::succeeded(&report));
            cli::print_outcome(&report, json)?;
        }
        Command::Status {
            name,
            profile,
            env_file,
            wait,
            json,
        } => {
            return cli::remote::status(&cli::remote::StatusArgs {
                name,
                profile,
                env_file,
                wait,
                json,
            });
        }
        Command::Profiles { env_file, what } => {
            return match what {
                None => cli::remote::list(env_file.as_deref()),
                Some(cli::ProfilesCommand::Example { family }) => {
                    cli::remote::example(family.as_deref())
                }
                Some(cli::ProfilesCommand::Show { name }) => {
                    cli::remote::show(env_file.as_deref(), &name)
                }
            };
        }
        Command::Inspect { path, .. } if ckpt_convert::inspect::is_yaml(&path) => {
            let v = ckpt_convert::inspect::inspect_yaml(&path)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Inspect { path, json, all } => {
            let i = ckpt_convert::inspect::inspect(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                cli::print_inspection(&i, all);
            }
        }
        Command::Validate { path, args } => return validate(Some(&path), &args),
        Command::Clean { paths, json } => {
            let mut cleaned = Vec::with_capacity(paths.len());
            for path in &paths {
                let c = ckpt_convert::publish::clean(path).map_err(|e| {
                    anyhow::Error::from(
                        ckpt_convert::pipeline::preflight::PreflightError::BadValue {
                            name: "PATH".into(),
                            value: path.display().to_string(),
                            expected: format!("an output, or a directory holding outputs ({e})"),
                        },
                    )
                })?;
                if !json {
                    for p in &c.removed {
                        println!("removed  {}", p.display());
                    }
                    for (from, to) in &c.restored {
                        println!("restored {} -> {}", from.display(), to.display());
                    }
                    for (p, why) in &c.kept {
                        println!("kept     {}: {why}", p.display());
                    }
                    if c.removed.is_empty() && c.restored.is_empty() && c.kept.is_empty() {
                        println!("nothing to clean in {}", path.display());
                    }
                }
                cleaned.push(c);
            }
            if json {
                // One path: its object, as before; several: one object each.
                let text = match cleaned.as_slice() {
                    [one] => serde_json::to_string_pretty(one)?,
                    all => serde_json::to_string_pretty(all)?,
                };
                println!("{text}");
            }
            // Something left in place (a run still writing it) is not clean yet:
            // a caller that waits for a clean target (the operator's cleanup Job)
            // must not take this for done.
            let kept: usize = cleaned.iter().map(|c| c.kept.len()).sum();
            if kept > 0 {
                eprintln!(
                    "error: {kept} left in place (listed above with why); run clean again once nothing holds them"
                );
                return Ok(ExitCode::from(1));
            }
        }
        Command::Demo { dir, json } => {
            let r = cli::demo::run(dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                cli::demo::print(&r);
            }
            if !cli::demo::passed(&r) {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `convert/validate`: the report, its summary for the orchestrator, exit code 1
/// when a check failed.
fn validate(path: Option<&std::path::Path>, args: &[String]) -> anyhow::Result<ExitCode> {
    let step = ckpt_convert::steps::validate::STEP;
    let (r, json) = match cli::validate(path, args) {
        Ok(r) => r,
        Err(err) => {
            report::write(&Summary::failed(
                step.name(),
                i32::from(exit_code(&err)),
                &format!("{err:#}"),
            ));
            return Err(err);
        }
    };
    report::write(&report::validated(&r));
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        cli::print_validation(&r);
    }
    Ok(if r.failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The library decides (for a run elsewhere, the run's own exit code); anything
/// else (bad words on the command line) is a bad invocation.
fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<ckpt_convert::Error>())
        .map(|e| e.exit_code() as u8)
        .or_else(|| {
            err.chain()
                .find_map(|e| e.downcast_ref::<ckpt_batch::Error>())
                .map(ckpt_batch::Error::exit_code)
        })
        .or_else(|| {
            err.chain()
                .find_map(|e| e.downcast_ref::<ckpt_convert::pipeline::preflight::PreflightError>())
                .map(|_| 2)
        })
        .or_else(|| {
            err.chain()
                .find_map(|e| e.downcast_ref::<std::io::Error>())
                .map(|_| 1)
        })
        .unwrap_or(2)
}
