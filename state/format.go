package state

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/upgrade"
)

// Formats of the records each store writes, recorded in the store itself
// (the KV key kvFormatKey, the Redis key <prefix>format) and migrated at
// start by Upgrade. To change a layout: raise the store's format, and add
// to kvSteps or redisSteps a step From the old format that rewrites the
// old layout into the new one, idempotently (see internal/upgrade).
const (
	// KVFormat 1: operations, mappings and exports under op., map. and
	// export., as since the first release.
	KVFormat = 1
	// RedisFormat 1: records as hashes (j, v) under the hash-tagged
	// prefix, indexes in sorted sets (see Redis). Format 0 is the first
	// releases' layout: JSON strings under "volumed:".
	RedisFormat = 1
)

// kvFormatKey is the bucket key of the embedded store's format; the
// store's watcher skips it.
const kvFormatKey = "meta.format"

// legacyRedisPrefix prefixed the keys of Redis format 0.
const legacyRedisPrefix = "volumed:"

// Upgrade brings the records of s to its store's format, or refuses them
// (upgrade.ErrRefused), before anything reads them.
func Upgrade(ctx context.Context, s Store, log *slog.Logger) error {
	switch s := s.(type) {
	case *KV:
		return upgrade.Plan{Name: "embedded store " + s.bucket, Current: KVFormat, Marker: kvMarker{s},
			Detect: func(context.Context) (int, error) { return KVFormat, nil }, Steps: kvSteps(s)}.Run(ctx, log)
	case *Redis:
		return upgrade.Plan{Name: "redis store " + s.p, Current: RedisFormat, Marker: redisMarker{s},
			Detect: s.detectFormat, Steps: redisSteps(s)}.Run(ctx, log)
	}
	return fmt.Errorf("state: upgrade: unknown store %T", s)
}

// kvSteps are the embedded store's migrations; none yet.
func kvSteps(*KV) []upgrade.Step { return nil }

// redisSteps are the Redis store's migrations.
func redisSteps(r *Redis) []upgrade.Step {
	return []upgrade.Step{{From: 0, Name: "copy the records of the first layout (JSON under volumed:) into hashes with indexes",
		Run: r.copyLegacy}}
}

// kvMarker records the embedded store's format under kvFormatKey.
type kvMarker struct{ k *KV }

var _ upgrade.Marker = kvMarker{}

func (m kvMarker) Format(ctx context.Context) (int, bool, error) {
	e, err := m.k.kv.Get(ctx, kvFormatKey)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, kvErr("read format", err)
	}
	return parseFormat(string(e.Value()))
}

func (m kvMarker) SetFormat(ctx context.Context, format int) error {
	if _, err := m.k.kv.Put(ctx, kvFormatKey, []byte(strconv.Itoa(format))); err != nil {
		return kvErr("record format", err)
	}
	return nil
}

// redisMarker records the Redis store's format under <prefix>format.
type redisMarker struct{ r *Redis }

var _ upgrade.Marker = redisMarker{}

func (m redisMarker) Format(ctx context.Context) (int, bool, error) {
	v, err := m.r.rdb.Get(ctx, m.r.p+"format").Result()
	if errors.Is(err, redis.Nil) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, m.r.wrap("read format", err)
	}
	return parseFormat(v)
}

func (m redisMarker) SetFormat(ctx context.Context, format int) error {
	if err := m.r.rdb.Set(ctx, m.r.p+"format", strconv.Itoa(format), 0).Err(); err != nil {
		return m.r.wrap("record format", err)
	}
	return nil
}

// parseFormat reads a recorded format; anything else is refused.
func parseFormat(s string) (int, bool, error) {
	f, err := strconv.Atoi(s)
	if err != nil || f < 0 {
		return 0, false, fmt.Errorf("state: %w: recorded format %q is not a number", upgrade.ErrRefused, s)
	}
	return f, true, nil
}

// detectFormat tells a store without a recorded format apart: format 0
// when the first layout's keys are there (even beside records of format
// 1: a release of format 1 started on them without reading them), else
// RedisFormat.
func (r *Redis) detectFormat(ctx context.Context) (int, error) {
	if r.p == legacyRedisPrefix {
		return RedisFormat, nil
	}
	found := false
	err := r.scanLegacy(ctx, "*", func(string) error { found = true; return errStopScan })
	if err != nil && !errors.Is(err, errStopScan) {
		return 0, err
	}
	if found {
		return 0, nil
	}
	return RedisFormat, nil
}

var errStopScan = errors.New("stop")

// scanLegacy calls fn with every key of the first layout matching
// legacyRedisPrefix+pattern, on every master of a cluster.
func (r *Redis) scanLegacy(ctx context.Context, pattern string, fn func(key string) error) error {
	scan := func(ctx context.Context, c *redis.Client) error {
		it := c.Scan(ctx, 0, legacyRedisPrefix+pattern, 1000).Iterator()
		for it.Next(ctx) {
			if err := fn(it.Val()); err != nil {
				return err
			}
		}
		if err := it.Err(); err != nil {
			return r.wrap("scan "+legacyRedisPrefix+pattern, err)
		}
		return nil
	}
	switch c := r.rdb.(type) {
	case *redis.Client:
		return scan(ctx, c)
	case *redis.ClusterClient:
		return c.ForEachMaster(ctx, scan)
	}
	return fmt.Errorf("state: redis client %T", r.rdb)
}

// copyLegacy writes every operation, mapping and export of the first
// layout through the store's own writes, each only if the store has no
// record of that id yet, so that running it again copies nothing twice.
// The old keys are left as they were (the recorded format tells they were
// read); nothing but this step reads them.
func (r *Redis) copyLegacy(ctx context.Context, log *slog.Logger) error {
	var ops, mappings, exports, skipped int
	copyKey := func(kind string, write func(data []byte) error) func(string) error {
		return func(key string) error {
			data, err := r.rdb.Get(ctx, key).Bytes()
			if errors.Is(err, redis.Nil) {
				return nil
			}
			if err != nil {
				return r.wrap("read "+key, err)
			}
			if err := write(data); err != nil {
				return fmt.Errorf("%s %s: %w", kind, key, err)
			}
			return nil
		}
	}
	err := r.scanLegacy(ctx, "op:*", copyKey("operation", func(data []byte) error {
		var op commands.Operation
		if err := decode(data, &op); err != nil {
			return err
		}
		op.Revision = 0
		_, err := r.CreateOperation(ctx, op)
		switch {
		case errors.Is(err, ErrExists):
			skipped++
			return nil
		case err == nil:
			ops++
		}
		return err
	}))
	if err != nil {
		return err
	}
	err = r.scanLegacy(ctx, "mapping:*", func(key string) error {
		if strings.HasPrefix(key, legacyRedisPrefix+"mapping:dev:") {
			return nil
		}
		return copyKey("mapping", func(data []byte) error {
			var m commands.Mapping
			if err := decode(data, &m); err != nil {
				return err
			}
			m.Revision = 0
			_, err := r.PutMapping(ctx, m)
			switch {
			case errors.Is(err, ErrStale):
				skipped++
				return nil
			case errors.Is(err, ErrConflict):
				log.Warn("mapping not copied: its device is another volume's", "volume_id", m.VolumeID, "vm_id", m.VMID,
					"device", m.DevicePath, "err", err)
				skipped++
				return nil
			case err == nil:
				mappings++
			}
			return err
		})(key)
	})
	if err != nil {
		return err
	}
	err = r.scanLegacy(ctx, "export:*", copyKey("export", func(data []byte) error {
		var e commands.Export
		if err := decode(data, &e); err != nil {
			return err
		}
		e.Revision = 0
		_, err := r.PutExport(ctx, e)
		switch {
		case errors.Is(err, ErrStale):
			skipped++
			return nil
		case err == nil:
			exports++
		}
		return err
	}))
	if err != nil {
		return err
	}
	log.Info("records copied from the first layout", "operations", ops, "mappings", mappings, "exports", exports,
		"skipped_present", skipped, "old_prefix", legacyRedisPrefix)
	return nil
}
