# The two commands of the quick start: `make demo` and `make test`. Both create the Python
# environment when it is missing (cached in ~/.cache/edkm, see scripts/setup_env.sh).
.PHONY: demo test build env bench clean

env:
	@scripts/setup_env.sh >/dev/null

build: env
	@scripts/build.sh

test: build
	@scripts/test.sh

demo: build
	@PYTHONPATH=python "$$(scripts/setup_env.sh)/bin/python" -m edkm demo

bench: build
	@PYTHONPATH=python "$$(scripts/setup_env.sh)/bin/python" -m edkm bench dkm

clean:
	rm -rf build python/edkm/lib python/edkm/_C*.so
