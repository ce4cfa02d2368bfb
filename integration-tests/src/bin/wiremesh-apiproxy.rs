//! `wiremesh-apiproxy`: the fault-injecting TCP proxy in front of the virtual cluster's API
//! server; see [`wiremesh_integration::apiproxy`].

fn main() {
    let args = match wiremesh_integration::apiproxy::ProxyArgs::parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(2);
        }
    };
    if let Err(error) = wiremesh_integration::apiproxy::run(&args) {
        eprintln!("wiremesh-apiproxy: {error}");
        std::process::exit(1);
    }
}
