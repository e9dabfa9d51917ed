"""Groups a perf profile's self time by crate (kernel, quinn-proto, ring, Downbeat...), then
lists the heaviest symbols. Usage: python3 groups.py PERF.DATA [SYMBOLS]. BENCHMARKS.md,
twenty-first round."""
import sys,re,collections,subprocess
f=sys.argv[1]
out=subprocess.run(['perf','report','-i',f,'--no-children','--sort','dso,sym','--stdio','-g','none'],capture_output=True,text=True).stdout
g=collections.Counter(); syms=collections.Counter()
for l in out.splitlines():
    m=re.match(r'\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)',l)
    if not m: continue
    p,dso,k,sym=float(m[1]),m[2],m[3],m[4].strip()
    if dso.startswith('[kernel'): c='kernel'
    elif 'libc' in dso or 'libm' in dso: c='libc'
    elif 'vdso' in dso: c='vdso'
    elif 'ring::' in sym or 'ring_core' in sym: c='ring'
    elif 'quinn_proto' in sym: c='quinn_proto'
    elif 'rustls' in sym: c='rustls'
    elif 'quinn_udp' in sym: c='quinn_udp'
    elif 'downbeat' in sym: c='downbeat'
    elif 'tokio' in sym: c='tokio'
    elif 'alloc::' in sym or 'core::' in sym or 'hashbrown' in sym or 'std::' in sym: c='std/alloc/core'
    else: c='other'
    g[c]+=p; syms[sym]+=p
for c,p in g.most_common(): print(f'{c:16s} {p:6.2f}')
print()
for s,p in syms.most_common(int(sys.argv[2]) if len(sys.argv)>2 else 25): print(f'{p:6.2f} {s[:150]}')
