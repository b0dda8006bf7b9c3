package main

import (
	"context"
	"testing"
	"time"
)

// TestLoadAndMeasure runs the bench's store half on a small history with
// the embedded store: every operation recorded through the store, every
// listing non-empty (the bench fails on an empty page), the counts equal
// to what it recorded. No figure is checked.
func TestLoadAndMeasure(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := config{store: "kv", n: 700, volumes: 50, vms: 10, callers: 5, writers: 8, samples: 3}
	g := newGenerator(c)
	if err := g.loadAndMeasure(ctx, t.TempDir()); err != nil {
		t.Fatal(err)
	}
}

// TestLoadAndMeasureFewPerVolume is TestLoadAndMeasure with three
// operations per volume: a deep cursor at a volume's oldest one would
// list an empty page.
func TestLoadAndMeasureFewPerVolume(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := config{store: "kv", n: 3000, volumes: 1000, vms: 100, callers: 5, writers: 8, samples: 20}
	if err := newGenerator(c).loadAndMeasure(ctx, t.TempDir()); err != nil {
		t.Fatal(err)
	}
}
