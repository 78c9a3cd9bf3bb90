#!/usr/bin/env bash
# Checks the packaging: the systemd units pass `systemd-analyze verify`
# (pointed at the freshly built binaries) and stay under their exposure
# budget (`systemd-analyze security`: 2.0 for the coordinator, 3.0 for the
# agent, whose NVML needs the GPU devices); both Debian packages build,
# with their man pages, shell completions and licence notices generated
# here, and hold what they should.
# Needs: systemd (systemd-analyze), cargo-deb (`cargo install cargo-deb`).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p lingua-agent -p lingua-coordinator
units=$(mktemp -d)
trap 'rm -rf "$units"' EXIT
for name in agent coordinator; do
  # verify checks that ExecStart exists: point it at the built binary.
  sed "s|/usr/bin/lingua-$name|$PWD/target/release/lingua-$name|" "packaging/lingua-$name.service" \
    > "$units/lingua-$name.service"
  systemd-analyze verify "$units/lingua-$name.service"
  threshold=$([ "$name" = agent ] && echo 30 || echo 20)
  exposure=$(systemd-analyze security --offline=yes "$units/lingua-$name.service" | tail -n 1)
  if ! systemd-analyze security --offline=yes --threshold="$threshold" \
      "$units/lingua-$name.service" >/dev/null; then
    echo "packaging: lingua-$name.service is over its exposure budget of $((threshold / 10)).0: $exposure" >&2
    exit 1
  fi
  echo "packaging: lingua-$name.service verified; $exposure"
done

# Man pages and completions from the binaries' own CLI definitions, and
# the licence notices of what each package is built from.
assets=target/release/assets
rm -rf "$assets"
target/release/lingua-agent --generate-docs "$assets/lingua-agent"
target/release/lingua-coordinator --generate-docs "$assets/lingua-coordinator"
target/release/lingua-ctl --generate-docs "$assets/lingua-coordinator"
for name in agent coordinator; do
  python3 packaging/licenses.py "lingua-$name" > "$assets/lingua-$name/THIRD-PARTY-LICENSES"
done

for name in agent coordinator; do
  deb=$(cargo deb --no-build -p "lingua-$name" | tail -n 1)
  echo "packaging: built $deb"
  contents=$(dpkg-deb -c "$deb")
  echo "$contents"
  expected=("./usr/bin/lingua-$name" "lingua-$name.service" "./etc/lingua/$name.toml"
    "./usr/share/man/man1/lingua-$name.1" "./usr/share/bash-completion/completions/lingua-$name"
    "./usr/share/zsh/vendor-completions/_lingua-$name" "./usr/share/fish/vendor_completions.d/lingua-$name.fish"
    "./usr/share/doc/lingua-$name/THIRD-PARTY-LICENSES" "./usr/share/doc/lingua-$name/changelog.Debian.gz")
  if [ "$name" = coordinator ]; then
    expected+=("./usr/bin/lingua-ctl" "./usr/share/man/man1/lingua-ctl.1")
  fi
  # Not a pipe into grep -q: under pipefail, grep leaving early kills
  # dpkg-deb with SIGPIPE and fails the check at random.
  for path in "${expected[@]}"; do
    grep -q -- "$path" <<<"$contents" || { echo "packaging: $deb lacks $path" >&2; exit 1; }
  done
  info=$(dpkg-deb -I "$deb")
  grep -q "conffiles" <<<"$info" || { echo "packaging: $deb declares no conffiles" >&2; exit 1; }
  if [ "$name" = coordinator ]; then
    grep -q "Recommends: redis-server" <<<"$info" || { echo "packaging: $deb does not recommend redis-server" >&2; exit 1; }
  fi
  # Each package's postinst touches only its own config, and no group.
  postinst=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./postinst | grep -v '^[[:space:]]*#')
  grep -q "/etc/lingua/$name.toml" <<<"$postinst" || { echo "packaging: $deb postinst misses its config" >&2; exit 1; }
  if grep -q "video\|/etc/lingua/\*" <<<"$postinst"; then
    echo "packaging: $deb postinst touches more than its own package needs" >&2
    exit 1
  fi
done
