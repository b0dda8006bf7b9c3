package redisstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"

	"github.com/redis/go-redis/v9"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/upgrade"
	"github.com/volumed/volumed/state"
)

// Format 2: format 1 and the requester index, ops:by:<requested_by>.
// Format 1: records as hashes (j, v) under the hash-tagged prefix, indexes
// in sorted sets (see Store). Format 0 is the first releases' layout: JSON
// strings under "volumed:". It is recorded under <prefix>format; to change
// the layout, raise it and add to steps a step From the old format (see
// state.Upgrade and internal/upgrade).
const Format = 2

// legacyPrefix prefixed the keys of format 0.
const legacyPrefix = "volumed:"

var _ state.Upgrader = (*Store)(nil)

// Upgrade brings the records of r to Format, or refuses them
// (upgrade.ErrRefused), before anything reads them; state.Upgrade calls it.
func (r *Store) Upgrade(ctx context.Context, log *slog.Logger) error {
	return upgrade.Plan{Name: "redis store " + r.p, Current: Format, Marker: marker{r},
		Detect: r.detectFormat, Steps: steps(r)}.Run(ctx, log)
}

// steps are the Redis store's migrations.
func steps(r *Store) []upgrade.Step {
	return []upgrade.Step{{From: 0, Name: "copy the records of the first layout (JSON under volumed:) into hashes with indexes",
		Run: r.copyLegacy}, {From: 1, Name: "index by requester the operations recorded with one", Run: r.indexRequesters}}
}

// marker records the Redis store's format under <prefix>format.
type marker struct{ r *Store }

var _ upgrade.Marker = marker{}

func (m marker) Format(ctx context.Context) (int, bool, error) {
	v, err := m.r.rdb.Get(ctx, m.r.p+"format").Result()
	if errors.Is(err, redis.Nil) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, m.r.wrap("read format", err)
	}
	return state.ParseFormat(v)
}

func (m marker) SetFormat(ctx context.Context, format int) error {
	if err := m.r.rdb.Set(ctx, m.r.p+"format", strconv.Itoa(format), 0).Err(); err != nil {
		return m.r.wrap("record format", err)
	}
	return nil
}

// detectFormat tells a store without a recorded format apart: format 0
// when the first layout's keys are there (even beside records of format
// 1: a release of format 1 started on them without reading them), format
// 1 when records are (the revision counter: written by a release from
// before formats were recorded), else Format (nothing recorded).
func (r *Store) detectFormat(ctx context.Context) (int, error) {
	if r.p == legacyPrefix {
		return Format, nil
	}
	found := false
	err := r.scanLegacy(ctx, "*", func(string) error { found = true; return errStopScan })
	if err != nil && !errors.Is(err, errStopScan) {
		return 0, err
	}
	if found {
		return 0, nil
	}
	n, err := r.rdb.Exists(ctx, r.revKey()).Result()
	if err != nil {
		return 0, r.wrap("detect format", err)
	}
	if n > 0 {
		return 1, nil
	}
	return Format, nil
}

var errStopScan = errors.New("stop")

// scanLegacy calls fn with every key of the first layout matching
// legacyPrefix+pattern, as scanKeys does.
func (r *Store) scanLegacy(ctx context.Context, pattern string, fn func(key string) error) error {
	return r.scanKeys(ctx, legacyPrefix+pattern, fn)
}

// scanKeys calls fn with every key matching match, on every master of a
// cluster. The masters are scanned at once (ForEachMaster), fn one call at
// a time.
func (r *Store) scanKeys(ctx context.Context, match string, fn func(key string) error) error {
	var mu sync.Mutex
	scan := func(ctx context.Context, c *redis.Client) error {
		it := c.Scan(ctx, 0, match, 1000).Iterator()
		for it.Next(ctx) {
			mu.Lock()
			err := fn(it.Val())
			mu.Unlock()
			if err != nil {
				return err
			}
		}
		if err := it.Err(); err != nil {
			return r.wrap("scan "+match, err)
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
func (r *Store) copyLegacy(ctx context.Context, log *slog.Logger) error {
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
		if err := state.Decode("op:*", "", data, &op); err != nil {
			return err
		}
		op.Revision = 0
		_, err := r.CreateOperation(ctx, op)
		switch {
		case errors.Is(err, state.ErrExists):
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
		if strings.HasPrefix(key, legacyPrefix+"mapping:dev:") {
			return nil
		}
		return copyKey("mapping", func(data []byte) error {
			var m commands.Mapping
			if err := state.Decode("mapping:*", "", data, &m); err != nil {
				return err
			}
			m.Revision = 0
			_, err := r.PutMapping(ctx, m)
			switch {
			case errors.Is(err, state.ErrStale):
				skipped++
				return nil
			case errors.Is(err, state.ErrConflict):
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
		if err := state.Decode("export:*", "", data, &e); err != nil {
			return err
		}
		e.Revision = 0
		_, err := r.PutExport(ctx, e)
		switch {
		case errors.Is(err, state.ErrStale):
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
		"skipped_present", skipped, "old_prefix", legacyPrefix)
	return nil
}
