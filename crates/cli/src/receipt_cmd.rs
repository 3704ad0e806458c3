//! `fleetbox receipt verify`: check a job's receipt offline, against keys pinned elsewhere.

use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct ReceiptArgs {
    #[command(subcommand)]
    pub command: ReceiptCommand,
}

#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Check a receipt (`fleetbox job ID --receipt > receipt.json`) without the coordinator or
    /// its database: its checkpoint is signed by a pinned key, its entries are in that signed
    /// chain, its result is the one the job's completion recorded, and each shard is the one
    /// accepted, from the report recorded with its agent's signature. Exits 1 when it fails.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The receipt (JSON).
    pub file: std::path::PathBuf,
    /// The coordinator public keys believed (hex, one per line: `fleetbox audit keys`).
    #[arg(long)]
    pub trusted_keys: std::path::PathBuf,
}

pub fn receipt(args: ReceiptArgs) -> anyhow::Result<ExitCode> {
    let ReceiptCommand::Verify(args) = args.command;
    let text = fs_err::read_to_string(&args.file)?;
    let receipt: fleetbox_server::receipt::Receipt = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a receipt: {e}", args.file.display()))?;
    let keys = fleetbox_server::custody::read_trusted_keys(&args.trusted_keys)?
        .into_iter()
        .collect();
    match fleetbox_server::receipt::verify(&receipt, &keys) {
        Ok(v) => {
            eprintln!(
                "fleetbox: receipt of `{}` verified: {} shard(s), {} verified by someone other than their reporter; {} entries in the chain signed at entry {} by {}",
                receipt.job_id, v.shards, v.verified_shards, v.entries, v.checkpoint_seq, v.key
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            eprintln!(
                "fleetbox: receipt of `{}` FAILED verification: {why}",
                receipt.job_id
            );
            Ok(ExitCode::from(1))
        }
    }
}
