# Sourced by demo.sh and test.sh: create ./.venv if needed, activate it, install the package with the
# extras given in $MIXSUP_EXTRAS if any of the modules in $MIXSUP_NEEDS is missing.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import $MIXSUP_NEEDS" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[$MIXSUP_EXTRAS]"
fi
