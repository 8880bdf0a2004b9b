#!/usr/bin/env bash
# Installs an edge node on ward hardware: the binary, a system user, a data
# directory only that user can read, the key the database is encrypted
# with (readable by that user alone), a configuration from the commented
# example, and the systemd unit. Idempotent: an existing configuration, key
# and data directory are kept.
#
#   sudo deploy/install-edge-node.sh --binary target/release/edge-node --node edge-ward-4b-1 --ward ward-4b
#
# Then enrol (deploy/README.md) and: systemctl enable --now edge-node
#
# Every path and the user can be overridden through the environment (for
# packaging, and for the test that installs into a temporary root):
#   ROOT (default /), SERVICE_USER (edge-node), BIN_DIR, CONFIG_DIR, DATA_DIR, UNIT_DIR
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
binary="" node="" ward=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --node) node=$2; shift 2 ;;
    --ward) ward=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -n "$binary" ] && [ -n "$node" ] && [ -n "$ward" ] || {
  echo "usage: $0 --binary PATH --node NODE_ID --ward WARD_ID" >&2
  exit 2
}
[ -x "$binary" ] || { echo "$binary is not an executable" >&2; exit 1; }

root=${ROOT:-/}
root=${root%/}
service_user=${SERVICE_USER:-edge-node}
bin_dir=${BIN_DIR:-$root/usr/local/bin}
config_dir=${CONFIG_DIR:-$root/etc/edge-node}
data_dir=${DATA_DIR:-$root/var/lib/edge-node}
unit_dir=${UNIT_DIR:-$root/etc/systemd/system}
config="$config_dir/edge-node.toml"
key="$config_dir/database.key"

# A system user with no login and no home of its own beyond the data directory.
if ! getent passwd "$service_user" >/dev/null; then
  useradd --system --home-dir "$data_dir" --no-create-home --shell /usr/sbin/nologin "$service_user"
  echo "created system user $service_user"
fi
service_group=$(id -gn "$service_user")

install -d -m 0755 "$bin_dir" "$unit_dir"
install -m 0755 "$binary" "$bin_dir/edge-node"
install -d -m 0750 -o "$service_user" -g "$service_group" "$data_dir"
install -d -m 0750 -o root -g "$service_group" "$config_dir"

# The database key: the node reads it as a systemd credential, the admin
# commands (run as the service user) from the file. Losing it loses the
# database and its backups: keep a copy in the hospital's key escrow.
if [ -e "$key" ]; then
  echo "kept the existing database key $key"
else
  "$binary" generate-key "$key.new"
  chown "$service_user:$service_group" "$key.new"
  chmod 0400 "$key.new"
  mv "$key.new" "$key"
  echo "wrote a new database key $key: copy it to the hospital's key escrow"
fi

if [ -e "$config" ]; then
  echo "kept the existing configuration $config"
else
  sed -e "s|^id = \".*\"|id = \"$node\"|" \
      -e "s|^ward = \".*\"|ward = \"$ward\"|" \
      -e "s|^data_dir = \".*\"|data_dir = \"$data_dir\"|" \
      -e "s|^key_file = \".*\"|key_file = \"$key\"|" \
      "$here/edge-node.example.toml" > "$config.new"
  chown "root:$service_group" "$config.new"
  chmod 0640 "$config.new"
  mv "$config.new" "$config"
  echo "wrote $config from the example: review [auth] and [sync] before enrolling"
fi
"$bin_dir/edge-node" --config "$config" check-config

sed -e "s|/usr/local/bin/edge-node|$bin_dir/edge-node|g" \
    -e "s|/etc/edge-node/edge-node.toml|$config|g" \
    -e "s|ReadWritePaths=/var/lib/edge-node|ReadWritePaths=$data_dir|" \
    -e "s|/etc/edge-node/database.key|$key|" \
    -e "s|^User=edge-node|User=$service_user|" \
    -e "s|^Group=edge-node|Group=$service_group|" \
    "$here/systemd/edge-node.service" > "$unit_dir/edge-node.service"
chmod 0644 "$unit_dir/edge-node.service"
echo "installed $unit_dir/edge-node.service"

if [ "$root" = "" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
cat <<NEXT
next steps:
  1. edit $config ([auth] url, [sync] bridge_url)
  2. sudo -u $service_user $bin_dir/edge-node --config $config enrol --credentials FILE
  3. systemctl enable --now edge-node
NEXT
