//! Stub: chat-client is built in its own issue; this binary only says so.
fn main() {
    eprintln!("chat-client: not built yet (see the project's open issues)");
    std::process::exit(2);
}
