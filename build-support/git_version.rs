// Shared by the build scripts of `ddpushd` and `ddpush` (pulled in with `include!`): sets
// `DDPUSH_VERSION` to the crate version plus the git commit it was built from, so
// `--version` says exactly which code runs. Outside a git checkout (a source tarball) the
// commit is taken from `DDPUSH_GIT_COMMIT` (set by deploy/Dockerfile's build argument) or
// reported as unknown rather than guessed.

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(std::env::var_os("CARGO_MANIFEST_DIR")?)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !s.trim().is_empty()).then(|| s.trim().to_string())
}

fn main() {
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rerun-if-env-changed=DDPUSH_GIT_COMMIT");
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).or_else(|| {
        std::env::var("DDPUSH_GIT_COMMIT")
            .ok()
            .filter(|c| !c.is_empty())
    });
    let text = match &commit {
        Some(c) => format!("{version} (git {c})"),
        None => format!("{version} (not built from a git checkout)"),
    };
    println!("cargo:rustc-env=DDPUSH_VERSION={text}");
    // Rebuild when HEAD moves (a commit, a checkout) so the reported commit stays true. Only
    // files that exist are named: cargo treats a missing one as always changed, which would
    // rebuild both binaries on every cargo invocation (a fresh clone has no packed-refs, a
    // packed branch no loose ref file).
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let mut watch = vec![
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ];
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--git-path", &r]) {
            // A packed branch has no loose file until its next commit writes one: watch the
            // folder it will appear in.
            let loose = std::path::Path::new(&path);
            match loose.parent() {
                Some(parent) if !dir.join(loose).exists() => {
                    watch.push(Some(parent.display().to_string()))
                }
                _ => watch.push(Some(path)),
            }
        }
    }
    for path in watch.into_iter().flatten() {
        if dir.join(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
