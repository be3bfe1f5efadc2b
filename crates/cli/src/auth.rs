//! `infermesh auth hash-key`: the `sha256:` line an auth file holds for an API key.

use std::io::Read;

#[derive(clap::Args)]
pub struct AuthArgs {
    #[command(subcommand)]
    command: AuthCommand,
}

#[derive(clap::Subcommand)]
enum AuthCommand {
    /// Make a new random API key and print it with its `sha256:` line for --auth-config
    /// (give the key to the caller, put the line in the file); with --stdin, hash the key
    /// read from standard input instead.
    HashKey {
        /// Read the key from standard input (one line) instead of making one.
        #[arg(long)]
        stdin: bool,
    },
}

pub fn run(args: AuthArgs) -> anyhow::Result<()> {
    match args.command {
        AuthCommand::HashKey { stdin } => {
            if stdin {
                let mut key = String::new();
                std::io::stdin().read_to_string(&mut key)?;
                let key = key.trim_end_matches(['\r', '\n']);
                anyhow::ensure!(!key.is_empty(), "no key on standard input");
                println!("{}", infermesh_core::auth::hash_key(key));
            } else {
                let key = new_key()?;
                println!("key: {key}");
                println!("{}", infermesh_core::auth::hash_key(&key));
            }
            Ok(())
        }
    }
}

/// 32 random bytes from the system's generator, as 64 hex digits.
fn new_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
