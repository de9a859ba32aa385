#!/bin/sh
# The capture init image (`kith sidecar init` in the injected `kith-init` container): the static
# `kith` binary beside `iptables`/`ip6tables` (both backends, nf_tables and legacy) and the
# libraries they need, taken from this machine's Debian packages. Nothing is pulled from an
# image registry: the packages come through `apt-get download` (the configured Debian mirror)
# and are unpacked with `dpkg-deb -x`, then `docker import` makes the image.
#
#   deploy/docker/build-init-image.sh target/x86_64-unknown-linux-gnu/release/kith kith-init:latest
#
# Where a registry is at hand, deploy/docker/Dockerfile.init builds the same thing from
# debian:bookworm-slim. Runs on Debian or Ubuntu (apt-get, apt-cache, dpkg-deb) as any user
# that may talk to the Docker engine.
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 <static kith binary> <image tag>" >&2
    exit 2
fi
kith=$1
tag=$2
if ! [ -x "$kith" ]; then
    echo "error: $kith is not an executable file" >&2
    exit 1
fi
case "$(file -b "$kith" 2>/dev/null || echo static)" in
*static*) ;;
*)
    echo "error: $kith is not statically linked; build it with" >&2
    echo "  RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target \$(rustc -vV | sed -n 's/^host: //p')" >&2
    exit 1
    ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
mkdir "$work/debs" "$work/root"
# apt's download sandbox user must be able to write here.
chmod 0777 "$work/debs"

# iptables and everything it depends on (libc included), nothing recommended.
pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances iptables | grep -v '^ ' | grep -v '^<' | sort -u)
(cd "$work/debs" && apt-get download -q $pkgs >/dev/null)
for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
done

root=$work/root
# What the packages' maintainer scripts would have done: update-alternatives picks the
# nf_tables backend for the plain names (kith sidecar init picks legacy itself when that is
# the backend already holding rules in the pod's namespace).
for name in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sf "${name%%-*}-nft${name#"${name%%-*}"}" "$root/usr/sbin/$name"
done
mkdir -p "$root/etc" "$root/run" "$root/tmp" "$root/usr/local/bin"
chmod 1777 "$root/tmp"
echo 'include /etc/ld.so.conf.d/*.conf' >"$root/etc/ld.so.conf"
ldconfig -r "$root"
# Drop what a capture step never reads.
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian" \
    "$root/usr/share/locale" "$root/usr/lib/x86_64-linux-gnu/gconv" \
    "$root/usr/lib/aarch64-linux-gnu/gconv"
install -m 0755 "$kith" "$root/usr/local/bin/kith"

# The plain names must run: a broken image fails here, not in every pod (chroot needs root).
if [ "$(id -u)" -eq 0 ]; then
    for bin in iptables ip6tables iptables-legacy ip6tables-legacy iptables-nft-save iptables-legacy-save; do
        if ! chroot "$root" "/usr/sbin/$bin" --version >/dev/null 2>&1; then
            echo "error: $bin does not run in the image's root" >&2
            exit 1
        fi
    done
fi

tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'USER 0:0' \
    --change 'ENTRYPOINT ["/usr/local/bin/kith"]' \
    --message "kith capture init image (iptables from Debian packages: $(echo $pkgs))" \
    - "$tag" >/dev/null
echo "$tag"
