# Source on the lent GPU machine (the device tool), from the repo root, with ../shared/gpu-kit copied to
# .gpu-kit and carried:   source scripts/gpu_kit_env.sh && bash scripts/gpu_check.sh "$OUT"
# Makes nnunetv2 (from the kit) and this checkout importable without installing the checkout (an
# editable install with that machine's venv pip failed there), and puts the console scripts
# next to the interpreter, where tests/test_end_to_end.py looks for them.
source .gpu-kit/install.sh || return 1
MIXSUP_BIN=$(dirname "$(python -c 'import sys; print(sys.executable)')")
ln -sfn ../trainers nnunet_mixsup/ext_trainers  # what setup.py's package_dir maps
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
printf '#!%s\nimport sys\nfrom nnunet_mixsup.cli import main\nif __name__ == "__main__":\n    sys.exit(main())\n' \
  "$MIXSUP_BIN/python" > "$MIXSUP_BIN/nnunet-mixsup"
chmod +x "$MIXSUP_BIN/nnunet-mixsup"
cp "${GPU_KIT_SITE:-/tmp/site}"/bin/nnUNetv2_* "$MIXSUP_BIN/"
hash -r
