#!/bin/sh
# Make Fashion-MNIST available where we can: Debian's dataset-fashion-mnist package
# (root only). Elsewhere fashion_func finds --data-dir, $FASHION_MNIST_DIR,
# ./dataset/fashion, or downloads it with torchvision when a network exists.
DEB_DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DEB_DIR/train-images-idx3-ubyte.gz" ] || [ -n "${FASHION_MNIST_DIR:-}" ] || [ -d dataset/fashion ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian package dataset-fashion-mnist" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
    echo "note: Fashion-MNIST not found; train.py will try torchvision's download into ./dataset/fashion" >&2
fi
exit 0
