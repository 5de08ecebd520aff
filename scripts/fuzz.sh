#!/usr/bin/env bash
# Fuzzes the agent protocol's frame decoders (fuzz/fuzz_targets/decode_frame.rs) for SECONDS
# (default 60). Usage: scripts/fuzz.sh [SECONDS]
#
# Works on the stable toolchain: cargo-fuzz's default address sanitizer needs nightly
# (-Zsanitizer), so the target is built with `-s none`, which uses only stable rustc flags (the
# sanitizer-coverage instrumentation libFuzzer needs is a stable -C option). The code fuzzed has no
# `unsafe`, so the sanitizer would add little. Builds go to fuzz/target, the corpus grows in
# fuzz/corpus/decode_frame from the seeds in fuzz/seeds/decode_frame (well-formed conversations),
# crashing inputs land in fuzz/artifacts/decode_frame (target, corpus and artifacts are ignored by
# git); a crash makes the script fail and prints how to replay it.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
case "$secs" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz into ~/.cargo/bin (once)"
  cargo install --locked cargo-fuzz
fi
# cargo-fuzz looks for its binaries in fuzz/target.
unset CARGO_TARGET_DIR
mkdir -p fuzz/corpus/decode_frame
echo "fuzz: decode_frame for ${secs} s"
cargo fuzz run -s none decode_frame fuzz/corpus/decode_frame fuzz/seeds/decode_frame -- \
  -max_total_time="$secs" -dict="$PWD/fuzz/decode_frame.dict" -print_final_stats=1
