# Conveniences; the README's plain cargo commands are the source of truth.

test:
    cargo test --workspace --release

ci:
    bash .ci/run

lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

bench:
    cargo bench --workspace
