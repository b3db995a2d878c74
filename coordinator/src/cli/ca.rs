//! `herd ca`: create the cluster CA and node certificates for mutual TLS.
//!
//! The work is in [`herd_net::ca`]; this module parses the arguments and prints what was
//! written. `init` never overwrites an existing CA, and `issue` never overwrites a certificate.

use std::path::PathBuf;

use anyhow::Context;
use herd_net::ca::{self, IssuedCert};

#[derive(clap::Args, Debug)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum CaCommand {
    /// Create the cluster CA (ca.pem, ca.key) and a first node certificate (node.pem, node.key).
    Init {
        /// Directory for the CA files (created if missing; must not hold a CA yet).
        #[arg(long)]
        dir: PathBuf,
        /// Comma-separated IP addresses and DNS names the `node` certificate is valid for.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        hosts: Vec<String>,
    },
    /// Issue another node certificate (NAME.pem, NAME.key), signed by the CA in DIR.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Node name: the certificate's identity and file name (letters, digits, '-', '.').
        #[arg(long)]
        name: String,
        /// Comma-separated IP addresses and DNS names the certificate is valid for.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
    },
}

pub fn run(args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        CaCommand::Init { dir, hosts } => {
            let init =
                ca::init_ca(&dir, &hosts).with_context(|| format!("creating a cluster CA in {}", dir.display()))?;
            println!("wrote {} (cluster CA certificate: copy it to every node)", init.ca_cert.display());
            println!("wrote {} (CA private key, 0600: keep it off the nodes)", init.ca_key.display());
            print_issued(&init.node);
        }
        CaCommand::Issue { dir, name, hosts } => {
            let issued = ca::issue(&dir, &name, &hosts)
                .with_context(|| format!("issuing a certificate for {name} from the CA in {}", dir.display()))?;
            print_issued(&issued);
        }
    }
    Ok(())
}

fn print_issued(issued: &IssuedCert) {
    println!("wrote {} (node certificate for {})", issued.cert.display(), issued.subject_alt_names.join(", "));
    println!("wrote {} (node private key, 0600)", issued.key.display());
}
