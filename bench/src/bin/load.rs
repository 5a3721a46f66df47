//! `load`: fortio's `load` command (see `petrel_bench::load`).

use petrel_bench::load::{self, report, LoadArgs};

fn main() {
    let args = match LoadArgs::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("load: cannot start: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", report::banner(&args));
    let result = match runtime.block_on(load::run(&args)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("load: {e}");
            std::process::exit(1);
        }
    };
    print!("{}", report::text(&args, &result));
    if let Some(path) = &args.json {
        let text = format!("{:#}\n", report::json(&args, &result));
        let written = if path == "-" {
            print!("{text}");
            Ok(())
        } else {
            std::fs::write(path, text)
        };
        if let Err(e) = written {
            eprintln!("load: cannot write {path}: {e}");
            std::process::exit(1);
        }
    }
}
