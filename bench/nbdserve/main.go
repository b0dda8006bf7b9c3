// Command nbdserve serves one block device or file with volumed's NBD
// server (package nbd), for the side-by-side benchmark against qemu-nbd
// (bench/nbd-vs-qemu.sh): the same server code volumed runs, without the
// daemon around it.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/volumed/volumed/nbd"
)

func main() {
	listen := flag.String("listen", nbd.DefaultListen, "address to serve on")
	name := flag.String("name", "vol00000001", "export name")
	path := flag.String("path", "", "block device or file to export")
	readOnly := flag.Bool("read-only", false, "export read-only")
	tlsDir := flag.String("tls-dir", "", "offer TLS with the certificates in this directory (created when missing)")
	flag.Parse()
	if err := run(*listen, *name, *path, *readOnly, *tlsDir); err != nil {
		fmt.Fprintln(os.Stderr, "nbdserve:", err)
		os.Exit(1)
	}
}

func run(listen, name, path string, readOnly bool, tlsDir string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg := nbd.Config{Listen: listen, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	if tlsDir != "" {
		tc, err := nbd.TLSConfig(tlsDir, nil)
		if err != nil {
			return err
		}
		cfg.TLS = tc
	}
	s, err := nbd.New(cfg)
	if err != nil {
		return err
	}
	if err := s.Start(ctx); err != nil {
		return err
	}
	if err := s.SetExports(ctx, []nbd.ExportSpec{{Name: name, Path: path, ReadOnly: readOnly}}); err != nil {
		s.Close(context.Background())
		return err
	}
	fmt.Println(s.Addr())
	<-ctx.Done()
	return s.Close(context.Background())
}
