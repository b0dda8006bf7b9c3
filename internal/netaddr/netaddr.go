// Package netaddr holds what several listeners ask of their addresses.
package netaddr

import (
	"net"
	"strings"
)

// IsLoopback reports whether a listen address (host:port) binds loopback
// only: localhost (any case) or a loopback IP. An empty host, any other
// name or an address without a port does not.
func IsLoopback(listen string) bool {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
