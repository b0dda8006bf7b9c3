# bench/base.sh, sourced by the side-by-side benches (ops.sh,
# inventory.sh): build_base REF DIR builds volumed from git REF (a clean
# export of it) into DIR/volumed-base; rev_of REF prints its short hash,
# and "+changes" for this tree when it differs from HEAD outside bench/.
build_base() {
	mkdir -p "$2/base-src"
	git archive "$1" | tar -x -C "$2/base-src"
	(cd "$2/base-src" && go build -o "$2/volumed-base" ./cmd/volumed)
	rm -rf "$2/base-src"
}

rev_of() {
	if [ "$1" = HEAD ]; then
		echo "$(git rev-parse --short HEAD)$([ -z "$(git status --porcelain -- . ':!bench')" ] || echo "+changes")"
	else
		git rev-parse --short "$1"
	fi
}
