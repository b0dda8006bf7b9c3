package state

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
)

// redisLayout is the version of the key layout this store writes, kept
// in the key P layout. Version 1, the layout before the key existed,
// indexed no requester; version 2 adds P ops:by:<requested_by>.
const redisLayout = 2

// indexRequesterScript adds an operation to its requester's index if its
// record is still at the revision read. KEYS: op, by index. ARGV:
// revision, id, score. Returns 1 when added, 0 when the record changed
// (its writer indexed it) or is gone.
var indexRequesterScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
`)

// migrate brings the keys to redisLayout at start: it indexes by
// requester every operation recorded with one under layout 1, then
// records the layout. Each step is idempotent (a ZADD of what the record
// holds, on its revision), so a start that dies in the middle does it
// again. Instances already on redisLayout index what they write.
func (r *Redis) migrate(ctx context.Context) error {
	v, err := r.rdb.Get(ctx, r.p+"layout").Int()
	if err != nil && !errors.Is(err, redis.Nil) {
		return r.wrap("read layout", err)
	}
	if v >= redisLayout {
		return nil
	}
	r.log.Debug("state layout migration started", "from", max(v, 1), "to", redisLayout)
	scanned, indexed := 0, 0
	err = r.scan(ctx, r.opKey("*"), func(keys []string) error {
		recs, err := r.readRecords(ctx, "migrate", keys)
		if err != nil {
			return err
		}
		for i, rec := range recs {
			scanned++
			var op commands.Operation
			if rec.raw == nil || decode(rec.raw, &op) != nil || op.RequestedBy == "" {
				continue
			}
			n, err := r.runWrite(ctx, "index requester", indexRequesterScript,
				[]string{keys[i], r.idxKey("by:" + op.RequestedBy)}, rec.rev, op.ID, opScore(op.CreatedAt))
			if err != nil {
				return err
			}
			indexed += int(n)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("state: redis layout migration: %w", err)
	}
	if err := r.rdb.Set(ctx, r.p+"layout", strconv.Itoa(redisLayout), 0).Err(); err != nil {
		return r.wrap("write layout", err)
	}
	if scanned > 0 { // not a new database
		r.log.Info("state layout migrated", "from", max(v, 1), "to", redisLayout, "operations", scanned,
			"indexed_by_requester", indexed)
	}
	return nil
}

// scan calls fn with each batch of keys matching pattern, on every
// master of a cluster (the prefix's hash tag puts them all on one).
func (r *Redis) scan(ctx context.Context, pattern string, fn func(keys []string) error) error {
	each := func(ctx context.Context, c redis.Cmdable) error {
		var cursor uint64
		for {
			keys, next, err := c.Scan(ctx, cursor, pattern, 1000).Result()
			if err != nil {
				return r.wrap("scan", err)
			}
			if len(keys) > 0 {
				if err := fn(keys); err != nil {
					return err
				}
			}
			if cursor = next; cursor == 0 {
				return nil
			}
		}
	}
	if cc, ok := r.rdb.(*redis.ClusterClient); ok {
		return cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return each(ctx, c) })
	}
	return each(ctx, r.rdb)
}
