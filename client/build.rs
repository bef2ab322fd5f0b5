//! Build script: the version string `--version` prints.
include!("../build-support/git_version.rs");
