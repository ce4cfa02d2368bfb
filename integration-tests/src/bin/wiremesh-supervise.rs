//! `wiremesh-supervise`: restarts one program whenever it exits; see
//! [`wiremesh_integration::supervise`].

fn main() {
    let args =
        match wiremesh_integration::supervise::SuperviseArgs::parse(std::env::args_os().skip(1)) {
            Ok(args) => args,
            Err(error) => {
                eprintln!("{error}");
                std::process::exit(2);
            }
        };
    match wiremesh_integration::supervise::run(&args) {
        Ok(status) => std::process::exit(wiremesh_integration::supervise::exit_code(status)),
        Err(error) => {
            eprintln!("wiremesh-supervise: {error}");
            std::process::exit(1);
        }
    }
}
