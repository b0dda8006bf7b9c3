package state_test

import (
	"context"
	"flag"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

var (
	cacheWriteOps    = flag.Int("cachewrite.ops", 100_000, "operations BenchmarkKVCacheWrites records before its rounds")
	cacheWriteRounds = flag.Int("cachewrite.rounds", 3, "rounds of BenchmarkKVCacheWrites")
	cacheWriteBatch  = flag.Int("cachewrite.batch", 4096, "operations each round of BenchmarkKVCacheWrites records")
)

// BenchmarkKVCacheWrites measures what a cache write costs and what a
// start from the cache takes on a history of -cachewrite.ops operations:
// each round restarts the store from its cache file (timed), records
// -cachewrite.batch more operations (as many as the periodic write
// waits for) and stops it, which writes the cache (the bytes of the
// files it wrote in the data dir are counted).
func BenchmarkKVCacheWrites(b *testing.B) {
	for b.Loop() {
		ctx := context.Background()
		js := testenv.StartBus(b).JetStream()
		s, err := state.NewKV(ctx, js, state.KVConfig{Bucket: "cachewrite"}) // the bucket
		if err != nil {
			b.Fatal(err)
		}
		_ = s.Close(ctx)
		fillBucket(b, js, "cachewrite", *cacheWriteOps)
		path := filepath.Join(b.TempDir(), "state-index.cache")
		cfg := state.KVConfig{Bucket: "cachewrite", IndexCache: path}
		s, err = state.NewKV(ctx, js, cfg)
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Close(ctx); err != nil {
			b.Fatal(err)
		}
		n := *cacheWriteOps
		var written, restart time.Duration
		var bytes int64
		for r := range *cacheWriteRounds {
			began := time.Now()
			s, err := state.NewKV(ctx, js, cfg)
			if err != nil {
				b.Fatal(err)
			}
			took := time.Since(began)
			restart += took
			fillOps(b, js, "cachewrite", n, n+*cacheWriteBatch)
			n += *cacheWriteBatch
			for {
				st, err := s.Stats(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if st.Total == int64(n) {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			before := dirFiles(b, filepath.Dir(path))
			began = time.Now()
			if err := s.Close(ctx); err != nil {
				b.Fatal(err)
			}
			written += time.Since(began)
			w := writtenBytes(before, dirFiles(b, filepath.Dir(path)))
			bytes += w
			b.Logf("round %d: %d operations: start from the cache %v, cache write %d bytes (%d per operation recorded)",
				r, n, took.Round(time.Millisecond), w, w/int64(*cacheWriteBatch))
		}
		rounds := int64(*cacheWriteRounds)
		b.ReportMetric(float64(bytes/rounds), "B/cachewrite")
		b.ReportMetric(float64(bytes/rounds/int64(*cacheWriteBatch)), "B/op-recorded")
		b.ReportMetric(float64(restart.Milliseconds())/float64(rounds), "ms/restart")
		b.ReportMetric(float64(written.Milliseconds())/float64(rounds), "ms/close")
	}
}

// fileID is what says a file was written: its inode, size and time.
type fileID struct {
	ino   uint64
	size  int64
	mtime time.Time
}

func dirFiles(b *testing.B, dir string) map[string]fileID {
	b.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		b.Fatal(err)
	}
	out := map[string]fileID{}
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			b.Fatal(err)
		}
		out[e.Name()] = fileID{info.Sys().(*syscall.Stat_t).Ino, info.Size(), info.ModTime()}
	}
	return out
}

// writtenBytes sums the sizes of the files in after that are not in
// before as they were.
func writtenBytes(before, after map[string]fileID) int64 {
	var n int64
	for name, f := range after {
		if before[name] != f {
			n += f.size
		}
	}
	return n
}
