//! `guarded-app [--exec-after-ms MS PROGRAM ARGS...]`: runs a Tokio
//! runtime (a ticking task) and, when asked, replaces itself with another
//! program after MS milliseconds (`exec`): the target of loopguard's
//! "attach follows an exec" end-to-end test.

use std::os::unix::process::CommandExt;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exec = match args.first().map(String::as_str) {
        Some("--exec-after-ms") if args.len() >= 3 => {
            let ms: u64 = args[1].parse().expect("--exec-after-ms takes milliseconds");
            Some((ms, args[2..].to_vec()))
        }
        None => None,
        _ => {
            eprintln!("usage: guarded-app [--exec-after-ms MS PROGRAM ARGS...]");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the runtime");
    let ms = exec.as_ref().map_or(u64::MAX, |(ms, _)| *ms);
    runtime.block_on(async move {
        println!("running pid {}", std::process::id());
        let ticker = tokio::spawn(async {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ticker.abort();
    });
    drop(runtime);
    if let Some((_, command)) = exec {
        let error = std::process::Command::new(&command[0])
            .args(&command[1..])
            .exec();
        eprintln!("guarded-app: cannot exec {}: {error}", command[0]);
        std::process::exit(1);
    }
}
