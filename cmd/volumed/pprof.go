package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/volumed/volumed/internal/netaddr"
)

// checkPprofListen refuses a --pprof-listen address off loopback: the
// profiles show the process's internals and have no authentication.
func checkPprofListen(addr string) error {
	if addr != "" && !netaddr.IsLoopback(addr) {
		return fmt.Errorf("%w: --pprof-listen: want a loopback address (127.0.0.1:PORT, [::1]:PORT, localhost:PORT), got %q", errUsage, addr)
	}
	return nil
}

// pprofServer serves net/http/pprof's handlers on their own loopback
// listener (--pprof-listen), apart from the REST API.
type pprofServer struct {
	srv  *http.Server
	ln   net.Listener
	done chan struct{}
}

// addr is the address it listens on.
func (p *pprofServer) addr() string { return p.ln.Addr().String() }

// startPprof listens on addr and serves /debug/pprof/ until Close.
func startPprof(addr string, log *slog.Logger) (*pprofServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("pprof: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	p := &pprofServer{srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln: ln, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		if err := p.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("pprof server stopped", "err", err)
		}
	}()
	log.Info("pprof ready", "addr", ln.Addr().String())
	return p, nil
}

// Close stops the listener and ends the requests in progress (a CPU
// profile being taken is cut short); it may be called again.
func (p *pprofServer) Close(ctx context.Context) error {
	if err := p.srv.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
