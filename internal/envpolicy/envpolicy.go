// Package envpolicy says which environment variables a spawn request may
// never set for a worker, whatever a backend's env_allow says: names that
// make the dynamic linker, libc or an interpreter load or run code (or
// files) of the caller's choosing inside the worker.
package envpolicy

import "strings"

// rule denies one exact name, or every name that starts with prefix.
type rule struct {
	name   string
	prefix bool
	reason string
}

const (
	whyLinker = "changes which shared objects the dynamic linker loads"
	whyLibc   = "makes libc load or read files it names"
	whyInterp = "makes an interpreter load or run code it names"
	whyShell  = "makes a shell run code it names"
)

// rules: the variables glibc itself drops for setuid programs, minus
// TMPDIR, plus loader and interpreter hooks.
// MALLOC_* is not denied as a whole: MALLOC_ARENA_MAX and friends are
// tuning that inference servers use; only MALLOC_TRACE (writes a trace file
// at a path it names) is.
var rules = []rule{
	{name: "LD_", prefix: true, reason: whyLinker},
	{name: "GLIBC_TUNABLES", reason: "tunes glibc internals, including the dynamic linker (CVE-2023-4911)"},
	{name: "GCONV_PATH", reason: "makes iconv load gconv modules (shared objects) from a directory it names"},
	{name: "GETCONF_DIR", reason: "makes getconf run programs from a directory it names"},
	{name: "HOSTALIASES", reason: whyLibc + " (host aliases)"},
	{name: "LOCALDOMAIN", reason: "changes how the resolver qualifies names"},
	{name: "RES_OPTIONS", reason: "changes how the resolver queries"},
	{name: "RESOLV_HOST_CONF", reason: whyLibc + " (resolver host.conf)"},
	{name: "LOCPATH", reason: whyLibc + " (locale data)"},
	{name: "NLSPATH", reason: whyLibc + " (message catalogs)"},
	{name: "NIS_PATH", reason: whyLibc + " (NIS+ search path)"},
	{name: "TZDIR", reason: whyLibc + " (time zone data)"},
	{name: "MALLOC_TRACE", reason: "makes glibc write a trace file at a path it names"},
	{name: "PATH", reason: "changes which programs a worker's exec and scripts run"},
	{name: "OPENSSL_CONF", reason: "makes OpenSSL load a config that can load engines (shared objects)"},
	{name: "OPENSSL_ENGINES", reason: whyLinker + " (OpenSSL engines)"},
	{name: "OPENSSL_MODULES", reason: whyLinker + " (OpenSSL providers)"},
	{name: "CUDA_INJECTION64_PATH", reason: "makes the CUDA driver load a shared object it names"},
	{name: "PYTHON", prefix: true, reason: whyInterp + " (PYTHONPATH, PYTHONSTARTUP, PYTHONHOME, PYTHONBREAKPOINT, ...)"},
	{name: "NODE_OPTIONS", reason: whyInterp + " (--require)"},
	{name: "NODE_PATH", reason: whyInterp},
	{name: "PERL5", prefix: true, reason: whyInterp + " (PERL5LIB, PERL5OPT, PERL5DB)"},
	{name: "PERLLIB", reason: whyInterp},
	{name: "RUBY", prefix: true, reason: whyInterp + " (RUBYOPT, RUBYLIB)"},
	{name: "GEM_PATH", reason: whyInterp},
	{name: "GEM_HOME", reason: whyInterp},
	{name: "LUA_INIT", prefix: true, reason: whyInterp},
	{name: "LUA_PATH", prefix: true, reason: whyInterp},
	{name: "LUA_CPATH", prefix: true, reason: whyLinker + " (Lua C modules)"},
	{name: "TCLLIBPATH", reason: whyInterp},
	{name: "JAVA_TOOL_OPTIONS", reason: whyInterp + " (-javaagent)"},
	{name: "_JAVA_OPTIONS", reason: whyInterp + " (-javaagent)"},
	{name: "JDK_JAVA_OPTIONS", reason: whyInterp + " (-javaagent)"},
	{name: "CLASSPATH", reason: whyInterp},
	{name: "DOTNET_STARTUP_HOOKS", reason: whyInterp},
	{name: "BASH_ENV", reason: whyShell + " (sourced by every non-interactive bash)"},
	{name: "ENV", reason: whyShell + " (sourced by sh and interactive shells)"},
	{name: "BASH_FUNC_", prefix: true, reason: whyShell + " (exported functions override commands)"},
	{name: "SHELLOPTS", reason: "changes how bash runs scripts (e.g. xtrace with PS4)"},
	{name: "BASHOPTS", reason: "changes how bash runs scripts"},
	{name: "PS4", reason: whyShell + " (expanded, command substitutions included, under xtrace)"},
	{name: "PROMPT_COMMAND", reason: whyShell},
	{name: "IFS", reason: "changes how shells split words, and so what scripts run"},
}

// DeniedEnv reports whether a spawn may never set name, and why. Names are
// compared exactly (the environment is case-sensitive and the loaders read
// the upper-case names only).
func DeniedEnv(name string) (bool, string) {
	for _, r := range rules {
		if name == r.name || (r.prefix && strings.HasPrefix(name, r.name)) {
			return true, name + " " + r.reason
		}
	}
	return false, ""
}
