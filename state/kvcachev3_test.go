package state

import (
	"bufio"
	"os"
	"time"

	"github.com/volumed/volumed/commands"
)

// The version 3 encoder, which the release before wrote with (the base
// inside the cache file): the tests write version 3 files with it, to
// check that this release reads them, and to test the base itself.

// writeCacheBody writes a cache file of version 3 to f, but its
// checksum: h, the mappings and exports, and the base of the operations
// of ops at revisions up to h.seq.
func writeCacheBody(f *os.File, h cacheHead, ops *opLayers, mappings map[string]kvEntry[commands.Mapping], exports map[string]kvEntry[commands.Export]) error {
	return writeBase(f, ops.records(h.seq), func(strs []string, kinds int, named []opNamed, termDur time.Duration) (int64, error) {
		cw := &countWriter{w: f}
		w := bufio.NewWriterSize(cw, 1<<16)
		e := cacheEncoder{w: w}
		h.encode(&e, kvCacheVersionV3)
		encodeEntries(&e, mappings, h.seq)
		encodeEntries(&e, exports, h.seq)
		encodeBaseTables(&e, strs, kinds, named, termDur)
		err := w.Flush()
		return cw.n, err
	})
}
