// How long a dependent load to memory takes here, with and without huge pages (issue 15,
// twentieth round; output in memory-latency.txt). usage: chase MEGABYTES HUGE(0|1)
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <stdint.h>
double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){ size_t bytes=(size_t)atol(argv[1])<<20; int huge=atoi(argv[2]);
 char*m=mmap(0,bytes+(2<<20),PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
 m=(char*)(((uintptr_t)m+(2<<20)-1)&~((uintptr_t)(2<<20)-1));
 madvise(m,bytes,huge?MADV_HUGEPAGE:MADV_NOHUGEPAGE);
 size_t lines=bytes/64; size_t *perm=malloc(lines*sizeof(size_t));
 for(size_t i=0;i<lines;i++)perm[i]=i;
 srand(1); for(size_t i=lines-1;i>0;i--){size_t j=((size_t)rand()*RAND_MAX+rand())%(i+1); size_t t=perm[i];perm[i]=perm[j];perm[j]=t;}
 for(size_t i=0;i<lines;i++){ *(char**)(m+perm[i]*64) = m+perm[(i+1)%lines]*64; }
 char*p=m+perm[0]*64; long N=20000000; double t0=now(); for(long i=0;i<N;i++) p=*(char**)p; double t1=now();
 FILE*f=fopen("/proc/self/smaps_rollup","r"); char l[256]; long ah=0; while(fgets(l,256,f)) if(sscanf(l,"AnonHugePages: %ld",&ah)==1) break;
 printf("%zu MB huge=%d: %.1f ns per dependent load (AnonHuge %ld kB) %p\n",bytes>>20,huge,(t1-t0)/N*1e9,ah,(void*)p);}
