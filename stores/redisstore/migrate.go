package redisstore

import (
	"context"
	"log/slog"

	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// indexRequesterScript adds an operation to its requester's index if its
// record is still at the revision read. KEYS: op, by index. ARGV:
// revision, id, score. Returns 1 when added, 0 when the record changed
// (its writer indexed it) or is gone.
var indexRequesterScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
`)

// indexRequesters migrates format 1 to 2: it adds every operation
// recorded with a requester to its requester index, reading the records
// in batches. Each addition is a ZADD of what the record holds at the
// revision read, so running it again (a crash before the format was
// recorded) changes nothing, and an operation written meanwhile by an
// instance of this release, which indexes what it writes, is left to it.
func (r *Store) indexRequesters(ctx context.Context, log *slog.Logger) error {
	scanned, indexed := 0, 0
	var batch []string
	flush := func() error {
		recs, err := r.readRecords(ctx, "index requesters", batch)
		if err != nil {
			return err
		}
		for i, rec := range recs {
			var op commands.Operation
			if rec.raw == nil || state.Decode(batch[i], "", rec.raw, &op) != nil || op.RequestedBy == "" {
				continue
			}
			n, err := r.runWrite(ctx, "index requester", indexRequesterScript,
				[]string{batch[i], r.idxKey("by:" + op.RequestedBy)}, rec.rev, op.ID, state.Score(op.CreatedAt))
			if err != nil {
				return err
			}
			indexed += int(n)
		}
		scanned += len(batch)
		batch = batch[:0]
		return nil
	}
	err := r.scanKeys(ctx, r.opKey("*"), func(key string) error {
		if batch = append(batch, key); len(batch) == 1000 {
			return flush()
		}
		return nil
	})
	if err == nil && len(batch) > 0 {
		err = flush()
	}
	if err != nil {
		return err
	}
	log.Info("operations indexed by requester", "operations", scanned, "indexed", indexed)
	return nil
}
