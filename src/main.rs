use std::process::ExitCode;

fn main() -> ExitCode {
    narfs::cli::main()
}
